"""A dataset reference (`file_...` or a URI) → a local path the loaders read (jobs, evaluations).

`s3://` URIs are read with the server's credentials, so they are limited to the locations the operator
lists in `dataset_s3_prefixes`: checked at submission (a 403) and again when the dataset is read.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from service.domain import files
from service.domain.errors import Forbidden, NotFound
from service.settings import Settings
from service.storage import ObjectMissing, Storage, create_storage
from service.storage.s3 import S3Location


@lru_cache(maxsize=4)
def default_storage(settings: Settings) -> Storage:
    """One storage (and S3 client) per process and configuration, for runners not handed one."""
    return create_storage(settings)


def is_s3_uri(uri: str) -> bool:
    return urlsplit(uri).scheme.lower() == "s3"


def allowed_s3_location(uri: str, settings: Settings) -> S3Location:
    """The object an `s3://bucket/key` dataset URI names, if it lies under an allowed prefix.

    Raises:
        Forbidden: a malformed URI, or a bucket/prefix the operator did not allow.
    """
    try:
        location = S3Location.parse(uri)
    except ValueError as exc:
        raise Forbidden(str(exc), code="dataset_uri_not_allowed", param="dataset_uri") from exc
    allowed = settings.dataset_s3_locations
    # A store or a proxy might resolve dot segments out of the prefix: such keys are refused outright.
    if any(seg in ("", ".", "..") for seg in location.prefix.split("/")):
        raise Forbidden(
            f"{uri}: an object key with empty, '.' or '..' segments is not accepted",
            code="dataset_uri_not_allowed",
            param="dataset_uri",
        )
    if not any(root.contains(location) for root in allowed):
        where = ", ".join(str(root) for root in allowed) or "none are configured"
        raise Forbidden(
            f"{uri} is not under an allowed s3:// location ({where})",
            code="dataset_uri_not_allowed",
            param="dataset_uri",
        )
    return location


def resolve_dataset(
    session_factory: sessionmaker[Session],
    tenant_id: str,
    uri: str,
    settings: Settings,
    storage: Storage | None = None,
) -> Path:
    """Uploaded files resolve (tenant-checked) to a local copy; URIs go through the engine's resolver.

    Raises the engine's DatasetError, so a runner reports every kind of bad dataset the same way, and
    `StorageUnavailable` while the object store does not answer (transient: the caller waits or retries).
    """
    from service.engine.data import resolve_dataset_uri
    from service.engine.errors import DatasetError

    if files.is_file_id(uri):
        with session_factory() as session:  # closed before the download: it holds no connection meanwhile
            try:
                key, sha256 = files.stored_object(session, tenant_id, uri)
            except NotFound as exc:
                raise DatasetError(exc.message, code="file_not_found", param="dataset_uri") from exc
        try:
            return (storage or default_storage(settings)).local_path(key, sha256)
        except ObjectMissing as exc:
            raise DatasetError(
                f"file {uri} has no stored bytes ({exc.message})", code="file_not_found", param="dataset_uri"
            ) from exc
    if is_s3_uri(uri):
        from service.storage.s3 import fetch_uri

        try:
            return fetch_uri(settings, allowed_s3_location(uri, settings))
        except Forbidden as exc:
            raise DatasetError(exc.message, code=exc.code, param="dataset_uri") from exc
        except ObjectMissing as exc:
            raise DatasetError(f"{uri} does not exist", code="invalid_dataset_uri") from exc
        except ValueError as exc:
            raise DatasetError(str(exc), code="invalid_dataset_uri") from exc
    return resolve_dataset_uri(
        uri,
        roots=settings.data_root_paths,
        allow_http=settings.allow_http_datasets,
        max_bytes=settings.max_dataset_bytes,
        cache_dir=settings.cache_dir,
    )
