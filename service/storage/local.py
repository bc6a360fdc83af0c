"""Uploaded files as files under one directory (embedded mode, or a volume every node mounts)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from service.storage import ObjectMissing


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

    def local_path(self, key: str, sha256: str) -> Path:
        """The stored file itself (no copy; the sha256 is checked at upload only)."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectMissing(f"no stored bytes under {key!r}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
