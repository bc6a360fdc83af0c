"""Uploaded files in an S3 bucket (AWS, MinIO, Ceph, moto): multipart uploads, reads through a local cache.

An upload is streamed in parts of `storage_part_bytes` while its sha256 is computed; the object exists
only once the upload completes (an object smaller than one part is one PUT, equally atomic), and a failed
upload is aborted, so a reader never finds half an object. The API keeps what it streamed in its own
cache (write-through), so checking the archive right after the upload costs no download; another node
downloads on first use into its cache and checks the bytes against the sha256 recorded at upload.

Credentials come from boto3's own chain (AWS_* environment variables, a profile, an instance role),
never from our settings. Every failure to reach the store is `StorageUnavailable` (a 503, or a job that
waits); a missing object is `ObjectMissing`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from service.engine.errors import ActpromptError
from service.storage import ObjectMissing, StorageUnavailable
from service.storage.cache import ObjectCache, suffix_of_key
from service.storage.metrics import STORAGE_BYTES, STORAGE_FAILURES

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("actprompt.storage.s3")

_CHUNK = 1 << 20
#: Backoff (seconds) of the background retries that abort an upload S3 did not let us abort at once.
_ABORT_RETRY_DELAYS = (0, 1, 2, 4, 8, 15, 30, 60, 60, 60, 60, 60, 60, 60, 60)
_MISSING_CODES = {"NoSuchKey", "NotFound", "404"}


@dataclass(frozen=True)
class S3Location:
    """`s3://bucket/prefix` split; `prefix` has no leading or trailing slash ('' = the whole bucket)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Raises ValueError for anything but `s3://bucket[/prefix]`."""
        scheme, sep, rest = url.partition("://")
        if scheme.lower() != "s3" or not sep:
            raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
        bucket, _, prefix = rest.partition("/")
        if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in ".-" for c in bucket):
            raise ValueError(f"{url!r}: {bucket!r} is not a valid bucket name")
        return cls(bucket.lower(), prefix.strip("/"))

    def contains(self, other: S3Location) -> bool:
        """`other` lies under this location, in whole segments (`s3://b/data` does not hold `b/database`)."""
        if other.bucket != self.bucket:
            return False
        return not self.prefix or other.prefix == self.prefix or other.prefix.startswith(self.prefix + "/")

    def overlaps(self, other: S3Location) -> bool:
        return self.contains(other) or other.contains(self)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _failure(exc: Exception, what: str, *, read: bool) -> ActpromptError:
    """A boto error as ours: a missing object on a read is ObjectMissing, anything else is unavailability."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if read and (code in _MISSING_CODES or status == 404):
            return ObjectMissing(f"{what}: no such object")
        return StorageUnavailable(f"{what}: the object store answered {code or status}")
    return StorageUnavailable(f"{what}: the object store is unreachable ({type(exc).__name__}: {exc})")


@contextlib.contextmanager
def _errors(what: str, *, read: bool = False) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, OSError) as exc:
        error = _failure(exc, what, read=read)
        STORAGE_FAILURES.labels("missing" if isinstance(error, ObjectMissing) else "unavailable").inc()
        raise error from exc


@lru_cache(maxsize=4)
def make_client(endpoint_url: str | None, region: str | None, timeout_s: float, max_attempts: int) -> Any:
    """One thread-safe boto3 client per configuration and process; credentials from boto3's chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        # MinIO, moto and most on-premise stores serve buckets as paths, not as host names
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def client_for(settings: Settings) -> Any:
    return make_client(  # an empty value (compose's `${VAR:-}`) means unset
        settings.s3_endpoint_url or None,
        settings.s3_region or None,
        settings.s3_timeout_seconds,
        settings.s3_max_attempts,
    )


def download(client: Any, bucket: str, key: str, out: IO[bytes], *, max_bytes: int | None = None) -> str:
    """Stream one object into `out`; returns its sha256. Raises ObjectMissing, StorageUnavailable, or
    ValueError when the object is over `max_bytes`."""
    h = hashlib.sha256()
    total = 0
    with _errors(f"reading s3://{bucket}/{key}", read=True):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in body.iter_chunks(_CHUNK):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise ValueError(f"s3://{bucket}/{key} is larger than the limit of {max_bytes} bytes")
                h.update(chunk)
                out.write(chunk)
        finally:
            body.close()
    STORAGE_BYTES.labels("download").inc(total)
    return h.hexdigest()


def _clean_up_in_background(
    client: Any, bucket: str, key: str, upload_id: str | None, *, delete: bool
) -> None:
    """Abort an upload (its parts go with it) and, when a completion may have landed, delete the object;
    retried with backoff while the store is down, off the caller's thread (an API request never waits)."""

    def once() -> bool:
        try:
            if delete:
                client.delete_object(Bucket=bucket, Key=key)
            if upload_id is not None:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            return _failure(exc, "abort", read=True).status == 404  # gone already
        return True

    def run() -> None:
        for tries, delay in enumerate(_ABORT_RETRY_DELAYS):
            time.sleep(delay)
            if once():
                if tries:
                    log.info("aborted upload cleaned up", extra={"key": key, "tries": tries + 1})
                return
        log.error(
            "aborted upload left behind; a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes it",
            extra={"key": key, "upload_id": upload_id},
        )

    threading.Thread(target=run, name="s3-abort", daemon=True).start()


class _S3Writer:
    """Buffers one part, sends it; keeps a local copy for the API's cache; commit = complete the upload."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._client = storage.client
        self._bucket = storage.location.bucket
        self._key = storage.object_key(key)
        self._suffix = suffix_of_key(key)
        self._cache = storage.cache
        self._part_bytes = storage.part_bytes
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None
        self._hash = hashlib.sha256()
        self._local, self._tmp = storage.cache.temp_file()
        self._committing = False
        self.bytes_written = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._local.write(chunk)
        self._buffer += chunk
        self.bytes_written += len(chunk)
        if len(self._buffer) >= self._part_bytes:
            self._send_part()

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _send_part(self) -> None:
        what = f"uploading s3://{self._bucket}/{self._key}"
        with _errors(what):
            if self._upload_id is None:
                self._upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)[
                    "UploadId"
                ]
            number = len(self._parts) + 1
            resp = self._client.upload_part(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=bytes(self._buffer),
            )
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})
        STORAGE_BYTES.labels("upload").inc(len(self._buffer))
        self._buffer.clear()

    def commit(self) -> None:
        self._local.close()
        self._committing = True
        with _errors(f"completing s3://{self._bucket}/{self._key}"):
            if self._upload_id is None:  # smaller than one part: one PUT, as atomic as a completed upload
                self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
                STORAGE_BYTES.labels("upload").inc(len(self._buffer))
            else:
                if self._buffer:
                    self._send_part()
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._buffer.clear()
        self._cache.adopt(self._tmp, self.sha256(), self._suffix)

    def abort(self) -> None:
        """Leave nothing: the local copy now; the parts, and an object a lost completion answer may have
        made, from a background thread (the store may be down: that must not hold the caller)."""
        self._local.close()
        self._tmp.unlink(missing_ok=True)
        self._buffer.clear()
        if self._upload_id is not None or self._committing:
            _clean_up_in_background(
                self._client, self._bucket, self._key, self._upload_id, delete=self._committing
            )


class S3Storage:
    """Uploads under `location` (`s3://bucket/prefix`), read through `cache` (keyed by the file's sha256)."""

    def __init__(self, client: Any, location: S3Location, cache: ObjectCache, part_bytes: int) -> None:
        self.client = client
        self.location = location
        self.cache = cache
        self.part_bytes = part_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        if not settings.storage_url:
            raise ValueError("storage_url is not set")
        return cls(
            client_for(settings),
            S3Location.parse(settings.storage_url),
            ObjectCache(settings.object_cache_dir, settings.storage_cache_bytes),
            settings.storage_part_bytes,
        )

    def object_key(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"storage key {key!r} is not a plain relative path")
        return self.location.key(key)

    def writer(self, key: str) -> _S3Writer:
        return _S3Writer(self, key)

    def local_path(self, key: str, sha256: str) -> Path:
        bucket, object_key = self.location.bucket, self.object_key(key)

        def fetch(out: IO[bytes]) -> str:
            return download(self.client, bucket, object_key, out)

        try:
            return self.cache.fill(sha256, suffix_of_key(key), fetch, verify=True)
        except ValueError as exc:  # the stored bytes are not those recorded at upload
            raise ObjectMissing(f"s3://{bucket}/{object_key} changed since its upload: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            with _errors(f"looking up {key}", read=True):
                self.client.head_object(Bucket=self.location.bucket, Key=self.object_key(key))
        except ObjectMissing:
            return False
        return True

    def delete(self, key: str) -> None:
        try:
            with _errors(f"deleting {key}"):
                self.client.delete_object(Bucket=self.location.bucket, Key=self.object_key(key))
        except StorageUnavailable as exc:
            log.warning("object left behind (no row names it)", extra={"key": key, "error": exc.message})


def fetch_uri(settings: Settings, location: S3Location) -> Path:
    """A tenant's `s3://` dataset (already checked against the allowed prefixes) as a cached local file.

    The cache key is the sha256 of the URI and the object's ETag, so a replaced object is fetched again.
    Raises ObjectMissing, StorageUnavailable, or ValueError for an object over `max_dataset_bytes`.
    """
    client = client_for(settings)
    bucket, key = location.bucket, location.prefix
    with _errors(f"looking up s3://{bucket}/{key}", read=True):
        head = client.head_object(Bucket=bucket, Key=key)
    size = int(head.get("ContentLength", 0))
    if size > settings.max_dataset_bytes:
        limit = settings.max_dataset_bytes
        raise ValueError(f"s3://{bucket}/{key} is {size} bytes, over the limit of {limit}")
    digest = hashlib.sha256(f"s3://{bucket}/{key}\n{head.get('ETag', '')}".encode()).hexdigest()
    cache = ObjectCache(settings.object_cache_dir, settings.storage_cache_bytes)

    def fetch(out: IO[bytes]) -> str:
        download(client, bucket, key, out, max_bytes=settings.max_dataset_bytes)
        return digest

    return cache.fill(digest, suffix_of_key(key), fetch, verify=False)
