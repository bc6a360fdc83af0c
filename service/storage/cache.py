"""A byte-bounded, least-recently-used cache of objects on local disk, keyed by sha256.

Why our own and not `cachetools`: cachetools keeps its index in one process's memory, while this cache is
a folder that outlives the process and is shared by every process of a node (an API with several
uvicorn workers, a worker host with several Celery processes). The folder *is* the index: an entry is
`<sha256><suffix>` (the suffix is kept because the dataset loaders dispatch on it), its modification time
is its last use, and eviction runs under an exclusive `flock` so two processes never over-evict. Entries
appear atomically (written under a `.part-` name, then renamed), so a reader never sees half an object.
An evicted file that a loader still has open stays readable until it is closed (POSIX unlink).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from service.storage.metrics import CACHE_EVICTED_BYTES, CACHE_REQUESTS

log = logging.getLogger("actprompt.storage.cache")

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,8}){0,2}$")
#: `.part-` files older than this were left by a process that died mid-download.
_STALE_PART_SECONDS = 6 * 3600


class ObjectCache:
    """Files under `root`, at most `max_bytes` in all (the newest entry is kept even when alone over it)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, digest: str, suffix: str) -> Path:
        if not _DIGEST.match(digest) or not _SUFFIX.match(suffix):
            raise ValueError(f"bad cache entry name {digest!r}{suffix!r}")
        return self.root / f"{digest}{suffix}"

    def get(self, digest: str, suffix: str) -> Path | None:
        """The entry, marked as just used; None on a miss."""
        path = self.path(digest, suffix)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def temp_file(self) -> tuple[IO[bytes], Path]:
        """An open file to fill in the cache folder (same file system, so `adopt` is a rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.root, prefix=".part-")
        return os.fdopen(fd, "wb"), Path(name)

    def adopt(self, tmp: Path, digest: str, suffix: str) -> Path:
        """Move a filled temp file in as the entry `digest` and evict down to the bound."""
        path = self.path(digest, suffix)
        os.replace(tmp, path)
        os.utime(path)
        self.evict(keep=path)
        return path

    def fill(self, digest: str, suffix: str, write: Callable[[IO[bytes]], str], *, verify: bool) -> Path:
        """The entry `digest`; on a miss `write(file)` fills it and returns the sha256 of what it wrote.

        Raises:
            ValueError: `verify` and the written bytes have another sha256 (nothing is cached).
        """
        hit = self.get(digest, suffix)
        CACHE_REQUESTS.labels("hit" if hit is not None else "miss").inc()
        if hit is not None:
            return hit
        out, tmp = self.temp_file()
        try:
            with out:
                got = write(out)
            if verify and got != digest:
                raise ValueError(f"the bytes have sha256 {got}, expected {digest}")
            return self.adopt(tmp, digest, suffix)
        finally:
            tmp.unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the folder holds at most `max_bytes`; bytes freed."""
        freed = 0
        with self._locked():
            entries = []
            now = time.time()
            for entry in os.scandir(self.root):
                if not entry.is_file(follow_symlinks=False) or entry.name == ".lock":
                    continue
                st = entry.stat(follow_symlinks=False)
                if entry.name.startswith(".part-"):
                    if now - st.st_mtime > _STALE_PART_SECONDS:
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                entries.append((st.st_mtime, st.st_size, Path(entry.path)))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if keep is not None and path == keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                freed += size
        if freed:
            CACHE_EVICTED_BYTES.inc(freed)
            log.info("object cache evicted", extra={"bytes": freed, "cache_bytes": total})
        return freed

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def suffix_of_key(key: str) -> str:
    """`t/file_x.tar.gz` -> `.tar.gz`: the loaders dispatch on the name, so a cached copy keeps it."""
    name = key.rsplit("/", 1)[-1]
    _, dot, rest = name.partition(".")
    suffix = f".{rest}" if dot else ""
    return suffix if _SUFFIX.match(suffix) else ""
