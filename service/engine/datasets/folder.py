"""Class-folder datasets, on disk or inside a ``.zip`` / ``.tar(.gz)`` archive.

Layout: ``root/<class>/<image>`` or ``root/{train,val,test}/<class>/<image>``; a single wrapping folder
(``root/mydata/<class>/...``, common in archives) is looked through. Archives are read member by
member into memory and never extracted to disk, so a hostile member name cannot write anywhere; names
that would escape the archive root are still refused (the archive is malformed or malicious), and the
total bytes read and number of members are bounded (zip bombs).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from service.engine.datasets.base import IMAGE_SUFFIXES, SPLIT_ALIASES, Collected
from service.engine.errors import DatasetError

#: Folder names that are never classes (OS and archiver litter).
_IGNORED_DIRS = frozenset({"__MACOSX", ".DS_Store", "__pycache__"})


@dataclass(frozen=True)
class Entry:
    """One regular file of the dataset tree: its path parts below the root and how to read it."""

    parts: tuple[str, ...]
    read: Callable[[], bytes]


def _hidden(part: str) -> bool:
    return part.startswith(".") or part in _IGNORED_DIRS


def _strip_wrapper(entries: list[Entry]) -> list[Entry]:
    """Drop a single top folder that wraps everything (``data.zip`` -> ``data/<class>/...``)."""
    while entries and all(len(e.parts) >= 3 for e in entries):
        tops = {e.parts[0] for e in entries}
        if len(tops) != 1 or next(iter(tops)).lower() in SPLIT_ALIASES:
            break
        entries = [Entry(e.parts[1:], e.read) for e in entries]
    return entries


def collect_tree(entries: list[Entry], *, max_bytes: int) -> Collected:
    """Turn the files of a class-folder tree into decoded samples."""
    out = Collected()
    entries = [e for e in entries if not any(_hidden(p) for p in e.parts)]
    entries = _strip_wrapper(entries)
    tops = {e.parts[0].lower() for e in entries if len(e.parts) >= 2}
    split_layout = bool(tops) and tops <= set(SPLIT_ALIASES) and "train" in {SPLIT_ALIASES[t] for t in tops}
    ignored = 0
    total = 0
    for entry in entries:  # archive order: tar.gz members are cheap to read forward only
        parts = entry.parts
        if split_layout:
            if len(parts) < 3 or parts[0].lower() not in SPLIT_ALIASES:
                ignored += 1
                continue
            split, label = SPLIT_ALIASES[parts[0].lower()], parts[1]
        else:
            if len(parts) < 2:
                ignored += 1
                continue
            split, label = "train", parts[0]
        if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            ignored += 1
            continue
        data = entry.read()
        total += len(data)
        if total > max_bytes:
            raise DatasetError(f"the dataset holds more than {max_bytes} bytes of images")
        out.add_bytes(split, label, "/".join(parts), data)
    out.samples.sort(key=lambda s: s.name)  # the same order from a folder and from its archive
    if ignored:
        out.warnings.append(f"ignored {ignored} file(s) that are not images inside a class folder")
    return out


def folder_entries(root: Path) -> list[Entry]:
    """Every regular file below ``root``; symlinks that lead outside ``root`` are skipped."""
    real_root = root.resolve()
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                continue
            if not path.is_file():
                continue
            parts = path.relative_to(real_root).parts
            entries.append(Entry(parts, path.read_bytes))
    return sorted(entries, key=lambda e: e.parts)  # os.walk order depends on the file system


def _safe_parts(name: str) -> tuple[str, ...]:
    """Archive member name -> path parts; refuses absolute names and ``..`` escapes."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise DatasetError(f"archive member {name!r} has an absolute path; refusing the archive")
    clean = posixpath.normpath(normalised)
    if clean == ".." or clean.startswith("../"):
        raise DatasetError(f"archive member {name!r} escapes the archive root; refusing the archive")
    return tuple(p for p in clean.split("/") if p not in ("", "."))


#: One image file above this is refused (a 64 MiB image is ~22 megapixels of raw RGB: no dataset image).
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
#: Inflated / compressed size above which a member is a bomb (photos: ~1; raw bitmaps: < 20; zeros: 1000).
DEFAULT_MAX_RATIO = 200
#: The ratio is judged only past this many inflated bytes (tiny files compress oddly well, harmlessly).
_RATIO_FLOOR = 1 << 20
_CHUNK = 1 << 20


@dataclass
class ArchiveLimits:
    """Bounds on what an archive may inflate to, checked on the bytes really read (never the headers)."""

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_total_bytes: int = 8 << 30
    max_ratio: float = DEFAULT_MAX_RATIO
    total_read: int = 0  # across members: the budget is shared


def _check_chunk(limits: ArchiveLimits, name: str, size: int, compressed: int | None) -> None:
    if size > limits.max_member_bytes:
        raise DatasetError(
            f"archive member {name!r} inflates to more than the limit of "
            f"{limits.max_member_bytes} bytes per file"
        )
    if limits.total_read > limits.max_total_bytes:
        raise DatasetError(
            f"archive member {name!r} takes the archive to more than the limit of "
            f"{limits.max_total_bytes} bytes in all"
        )
    if compressed is not None and size > _RATIO_FLOOR and size > limits.max_ratio * max(compressed, 1):
        raise DatasetError(
            f"archive member {name!r} inflates more than {limits.max_ratio:g} times its compressed size "
            f"({compressed} bytes): refusing a likely zip bomb"
        )


def _bounded_reader(
    open_member: Callable[[], IO[bytes] | None], limits: ArchiveLimits, name: str, compressed: int | None
) -> Callable[[], bytes]:
    """A reader that streams a member in chunks and stops at the first limit it crosses, naming it.

    At most one chunk past a limit is ever held, whatever the member's header claims about its size.
    ``compressed`` is the member's compressed size (zip), or None (tar: the archive's own ratio applies).
    """

    def read() -> bytes:
        fh = open_member()
        if fh is None:
            raise DatasetError(f"archive member {name!r} cannot be read")
        chunks: list[bytes] = []
        size = 0
        with fh:
            while chunk := fh.read(_CHUNK):
                size += len(chunk)
                limits.total_read += len(chunk)
                _check_chunk(limits, name, size, compressed)
                chunks.append(chunk)
        return b"".join(chunks)

    return read


def _tar_ratio_checked(
    read: Callable[[], bytes], limits: ArchiveLimits, name: str, path: Path
) -> Callable[[], bytes]:
    """A compressed tar is one stream: its ratio is what the members read so far inflate from the file."""
    archive_size = max(path.stat().st_size, 1)

    def checked() -> bytes:
        data = read()
        if limits.total_read > _RATIO_FLOOR and limits.total_read > limits.max_ratio * archive_size:
            raise DatasetError(
                f"archive member {name!r} takes the archive past {limits.max_ratio:g} times its size on "
                f"disk ({archive_size} bytes): refusing a likely decompression bomb"
            )
        return data

    return checked


@contextmanager
def open_archive(
    path: Path, *, max_bytes: int, max_members: int, limits: ArchiveLimits | None = None
) -> Iterator[list[Entry]]:
    """The regular-file members of a zip or tar archive, readable while the context is open.

    Links, devices and folders are skipped; a member name that escapes the root refuses the archive.
    Reading a member enforces ``limits``: per member, in total (at most ``max_bytes``), and the ratio.
    """
    limits = limits or ArchiveLimits()
    limits.max_total_bytes = min(limits.max_total_bytes, max_bytes)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise DatasetError(f"the archive has {len(infos)} members, more than {max_members}")
            entries = []
            for info in infos:
                parts = _safe_parts(info.filename)
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                if info.is_dir() or is_link or not parts:
                    continue
                reader = _bounded_reader(partial(zf.open, info), limits, info.filename, info.compress_size)
                entries.append(Entry(parts, reader))
            yield entries
        return
    try:
        tf = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the `with tf` below
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{path.name} is not a readable zip or tar archive: {exc}") from exc
    with tf:
        entries = []
        for count, member in enumerate(tf, start=1):
            if count > max_members:
                raise DatasetError(f"the archive has more than {max_members} members")
            parts = _safe_parts(member.name)
            if not member.isfile() or not parts:  # symlinks, hard links, devices, folders
                continue
            reader = _bounded_reader(partial(tf.extractfile, member), limits, member.name, None)
            entries.append(Entry(parts, _tar_ratio_checked(reader, limits, member.name, path)))
        yield entries


def load_archive(path: Path, *, max_bytes: int, max_members: int) -> Collected:
    """Decode a class-folder tree straight out of an archive (nothing is written to disk)."""
    try:
        with open_archive(path, max_bytes=max_bytes, max_members=max_members) as entries:
            return collect_tree(entries, max_bytes=max_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{path.name} is a corrupt archive: {exc}") from exc
