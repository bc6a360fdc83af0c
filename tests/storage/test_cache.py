"""The on-disk object cache: bounded in bytes, least recently used out first, content-checked fills."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO

import pytest

from service.storage.cache import ObjectCache, suffix_of_key


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put(cache: ObjectCache, data: bytes, suffix: str = ".zip") -> Path:
    def write(out: IO[bytes]) -> str:
        out.write(data)
        return _digest(data)

    return cache.fill(_digest(data), suffix, write, verify=True)


def _age(path: Path, seconds_ago: float) -> None:
    t = path.stat().st_mtime - seconds_ago
    os.utime(path, (t, t))


def test_least_recently_used_go_first_and_the_folder_stays_under_its_bound(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path / "objects", max_bytes=250)
    a, b = _put(cache, b"a" * 100), _put(cache, b"b" * 100)
    _age(a, 30)
    _age(b, 20)
    assert cache.get(_digest(b"a" * 100), ".zip") == a  # a used again: b is now the oldest
    c = _put(cache, b"c" * 100)
    assert a.exists() and c.exists() and not b.exists()
    assert sum(p.stat().st_size for p in cache.root.iterdir() if not p.name.startswith(".")) <= 250
    assert cache.get(_digest(b"b" * 100), ".zip") is None


def test_an_entry_over_the_whole_bound_is_kept_alone(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path / "objects", max_bytes=50)
    small = _put(cache, b"s" * 40)
    _age(small, 10)
    big = _put(cache, b"B" * 120)
    assert big.read_bytes() == b"B" * 120 and not small.exists()


def test_a_fill_whose_bytes_do_not_hash_to_the_key_leaves_nothing(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path / "objects", max_bytes=1 << 20)

    def wrong(out: IO[bytes]) -> str:
        out.write(b"tampered")
        return _digest(b"tampered")

    with pytest.raises(ValueError, match="sha256"):
        cache.fill(_digest(b"original"), ".npz", wrong, verify=True)
    assert [p.name for p in cache.root.iterdir() if p.name != ".lock"] == []


def test_names_are_checked_and_keep_the_loader_suffix(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, 1)
    with pytest.raises(ValueError):
        cache.path("../etc/passwd", "")
    with pytest.raises(ValueError):
        cache.path(_digest(b"x"), "/../x")
    assert suffix_of_key("t/file_01ab.tar.gz") == ".tar.gz"
    assert suffix_of_key("datasets/a/b/train.npz") == ".npz"
    assert suffix_of_key("noext") == ""
