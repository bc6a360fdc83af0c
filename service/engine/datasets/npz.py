"""Packed ``.npz`` datasets: ``x_train, y_train[, x_val, y_val][, x_test, y_test][, classes]``.

The format of ../shared/data: uint8 HWC pixels and integer labels. Loaded with ``allow_pickle=False``
(a pickled array would run code from the file).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from service.engine.datasets.base import (
    ImageSet,
    LoadedDataset,
    ValidationReport,
    below_minimum_message,
    dataset_refused,
    sort_class_names,
)
from service.engine.errors import DatasetError


def _images(x: np.ndarray, key: str) -> np.ndarray:
    """Any of [N,H,W], [N,H,W,1|3|4], uint8 or float in [0,1] -> uint8 [N,H,W,C] with C in {1,3}."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or min(x.shape[1:3], default=0) < 1:
        raise DatasetError(f"{key} must have shape [N, H, W] or [N, H, W, C] with C in 1/3/4, got {x.shape}")
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{key} must be numeric, got {x.dtype}")
    xf = x.astype(np.float32)
    if xf.size and float(np.nanmax(xf)) <= 1.0:
        xf = xf * 255.0
    return np.clip(np.nan_to_num(xf), 0, 255).round().astype(np.uint8)


def _labels(y: np.ndarray, n: int, num_classes: int | None, key: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise DatasetError(f"{key} has {y.shape[0]} labels for {n} images")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DatasetError(f"{key} must hold integer class indices, got {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise DatasetError(f"{key} has labels outside [0, {num_classes})")
    return y


def load_npz(path: Path, *, min_images_per_class: int) -> LoadedDataset:
    """Load a packed dataset; ``classes`` (when present) gives the names in label order."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path.name} is not a readable .npz without pickled objects: {exc}") from exc
    if "x_train" not in arrays or "y_train" not in arrays:
        raise DatasetError(f"{path.name} needs arrays x_train and y_train, has {sorted(arrays)}")
    names: list[str] | None = None
    if "classes" in arrays:
        names = [str(c) for c in np.asarray(arrays["classes"]).reshape(-1).tolist()]
        if len(set(names)) != len(names):
            raise DatasetError(f"{path.name}: 'classes' has duplicate names")
    num_classes = len(names) if names is not None else None
    splits: dict[str, ImageSet | None] = {"train": None, "val": None, "test": None}
    for split in splits:
        xk, yk = f"x_{split}", f"y_{split}"
        if (xk in arrays) != (yk in arrays):
            raise DatasetError(f"{path.name} has only one of {xk} / {yk}")
        if xk in arrays:
            x = _images(arrays[xk], xk)
            splits[split] = ImageSet(x, _labels(arrays[yk], len(x), num_classes, yk))
    train = splits["train"]
    if train is None or len(train) == 0:
        raise DatasetError(f"{path.name} has no training images")
    if names is None:
        top = max(int(s.labels.max()) for s in splits.values() if s is not None and len(s)) + 1
        names = sort_class_names(str(i) for i in range(top))
    counts = np.bincount(train.labels, minlength=len(names))
    images_per_class = {name: int(counts[i]) for i, name in enumerate(names)}
    below = [name for name in names if images_per_class[name] < min_images_per_class]
    if len(names) < 2:
        message = f"a classification dataset needs at least 2 classes, found {len(names)}"
        raise dataset_refused(message, images_per_class, below)
    if below:
        message = below_minimum_message(below, images_per_class, min_images_per_class)
        raise dataset_refused(message, images_per_class, below)
    report = ValidationReport(
        num_classes=len(names),
        images_per_class=images_per_class,
        num_train=len(train),
        num_val=len(splits["val"]) if splits["val"] is not None else 0,
        num_test=len(splits["test"]) if splits["test"] is not None else 0,
    )
    return LoadedDataset(names, train, splits["val"], splits["test"], report)
