"""Datasets: load any supported format into a validated :class:`LoadedDataset`, split, preprocess.

Formats: a folder with one sub-folder per class (optionally ``train/ val/ test/``), a
``.zip`` / ``.tar`` / ``.tar.gz`` of that, a CSV or JSONL manifest (``path,label``), or an ``.npz``
with ``x_train, y_train[, x_test, y_test, classes]``. The format loaders live in
``service.engine.datasets``; this module picks one and re-exports the public names.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from service.engine.datasets.base import (
    ImageSet,
    LoadedDataset,
    ValidationReport,
    build_dataset,
)
from service.engine.datasets.folder import collect_tree, folder_entries, load_archive
from service.engine.datasets.manifest import load_manifest
from service.engine.datasets.npz import load_npz
from service.engine.datasets.remote import resolve_dataset_uri
from service.engine.datasets.transforms import split_train_val
from service.engine.errors import DatasetError

__all__ = [
    "ImageSet",
    "LoadedDataset",
    "ValidationReport",
    "load_dataset",
    "resolve_dataset_uri",
    "split_train_val",
]

#: Default bound on the image bytes one dataset may hold (and an archive may inflate to).
DEFAULT_MAX_BYTES = 8 << 30
#: Default bound on archive members (a zip of millions of empty files is a cheap denial of service).
DEFAULT_MAX_MEMBERS = 2_000_000


def detect_format(path: Path) -> str:
    """``folder`` | ``archive`` | ``manifest`` | ``npz``, by suffix, else by the file's first bytes."""
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "archive"
    if name.endswith((".csv", ".jsonl", ".ndjson")):
        return "manifest"
    if zipfile.is_zipfile(path):  # an .npz is a zip of .npy members
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        return "npz" if names and all(n.endswith(".npy") for n in names) else "archive"
    if tarfile.is_tarfile(path):
        return "archive"
    raise DatasetError(f"{path.name}: unknown dataset format (expected a folder, archive, manifest or .npz)")


def load_dataset(
    path: Path,
    *,
    min_images_per_class: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> LoadedDataset:
    """Load and validate a dataset from a local folder or file.

    Images that do not decode are skipped and listed in the report; the load fails only when the
    dataset as a whole is unusable.

    Args:
        path: a class folder, archive, manifest or ``.npz`` (see the module docstring).
        min_images_per_class: every class needs at least this many training images.
        max_bytes: bound on the image bytes read (and on what an archive may inflate to).
        max_members: bound on the number of archive members.

    Raises:
        DatasetError: unreadable or unknown format, no images, fewer than 2 classes, or classes below
            the minimum (the message names them).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path {path} does not exist")
    kind = detect_format(path)
    if kind == "npz":
        return load_npz(path, min_images_per_class=min_images_per_class)
    if kind == "folder":
        collected = collect_tree(folder_entries(path), max_bytes=max_bytes)
    elif kind == "archive":
        collected = load_archive(path, max_bytes=max_bytes, max_members=max_members)
    else:
        collected = load_manifest(path, max_bytes=max_bytes)
    return build_dataset(collected, min_images_per_class=min_images_per_class)
