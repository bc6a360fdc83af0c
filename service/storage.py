"""Where uploaded files live: one small interface, a local-directory implementation.

The API streams an upload into `Storage.writer(key)`; the job runner and the evaluation runner read it
back through `Storage.local_path(key)`, because every dataset loader reads a local file. An object store
(S3, GCS) would implement the same four calls: `writer` as a multipart upload, `delete` as a delete, and
`local_path` as a download into the var cache keyed by the object's sha256 (see docs/FILES.md).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol


class StorageWriter(Protocol):
    """Chunks in, then `commit()` (the object appears whole) or `abort()` (nothing is left behind)."""

    bytes_written: int

    def write(self, chunk: bytes) -> None: ...

    def sha256(self) -> str: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    def writer(self, key: str) -> StorageWriter: ...

    def local_path(self, key: str) -> Path: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...


class _LocalWriter:
    def __init__(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._target = target
        self._hash = hashlib.sha256()
        self.bytes_written = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.bytes_written += len(chunk)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> None:
        self._file.close()
        os.replace(self._tmp, self._target)  # atomic: a reader never sees half a file

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class LocalStorage:
    """Files under one directory (embedded: `var/files`; production: a volume shared by API and workers)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"storage key {key!r} leaves the storage root")
        return path

    def writer(self, key: str) -> _LocalWriter:
        return _LocalWriter(self._path(key))

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def create_storage(root: Path) -> Storage:
    """The configured storage; one implementation today (see the module docstring for object stores)."""
    return LocalStorage(root)
