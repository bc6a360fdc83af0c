"""Where uploaded files live: one small interface, a local-directory and an S3 implementation.

The API streams an upload into `Storage.writer(key)`; the job runner and the evaluation runner read it
back through `Storage.local_path(key, sha256)`, because every dataset loader reads a local file. The local
implementation hands out its own file; the S3 one (`service.storage.s3`) uploads in parts and reads
through a byte-bounded on-disk cache keyed by the object's sha256 (`service.storage.cache`), so an API
replica and a worker on different nodes share uploads without a shared volume.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from service.engine.errors import ActpromptError

if TYPE_CHECKING:
    from service.settings import Settings


class StorageUnavailable(ActpromptError):
    """The object store did not answer (down, timing out, throttling, refusing us): try again later."""

    status = 503
    code = "storage_unavailable"


class ObjectMissing(ActpromptError):
    """No stored object under the key, or its bytes no longer match the sha256 recorded at upload."""

    status = 404
    code = "object_missing"


class StorageWriter(Protocol):
    """Chunks in, then `commit()` (the object appears whole) or `abort()` (nothing is left behind)."""

    bytes_written: int

    def write(self, chunk: bytes) -> None: ...

    def sha256(self) -> str: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    def writer(self, key: str) -> StorageWriter: ...

    def local_path(self, key: str, sha256: str) -> Path:
        """A local file with the object's bytes (raises ObjectMissing, StorageUnavailable)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; best effort (a leftover object no row names is harmless)."""
        ...


def create_storage(settings: Settings) -> Storage:
    """`ACTPROMPT_STORAGE_URL=s3://bucket/prefix`: S3; unset: the local folder `files_root`."""
    if settings.storage_url:
        from service.storage.s3 import S3Storage

        return S3Storage.from_settings(settings)
    from service.storage.local import LocalStorage

    return LocalStorage(settings.files_root)
