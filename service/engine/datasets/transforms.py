"""Turning decoded images into backbone input, and the deterministic train/val split."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from service.engine.datasets.base import ImageSet, LoadedDataset
from service.engine.errors import DatasetError

#: Images converted per chunk: bounds the float32 intermediates, not the output.
_CHUNK = 256


def _as_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    if isinstance(images, np.ndarray):
        if images.ndim == 3:  # [N, H, W] grayscale
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
        return images
    out = []
    for im in images:
        arr = np.asarray(im)
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return out


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8/float [B, H, W, C] -> float32 [B, 3, H, W] in 0..255 (gray repeated, alpha dropped)."""
    if batch.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images need 1, 3 or 4 channels, got {batch.shape[-1]}")
    if not batch.flags.writeable:  # torch warns on read-only arrays (np.load, PIL views)
        batch = batch.copy()
    t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(torch.float32)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t[:, :3]


def preprocess(
    images: np.ndarray | Sequence[np.ndarray],
    input_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Decoded uint8 HWC images -> normalised float32 [N, 3, H, W] at the backbone's input size.

    Grayscale is repeated to 3 channels (the backbones are RGB); a resize is bilinear with antialias,
    so downscaling does not alias; pixels are scaled to [0, 1] and normalised with ``mean``/``std``.
    Images of different sizes are accepted (a list); each is resized on its own.
    """
    size = (
        (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    )
    imgs = _as_list(images)
    if _at_size(imgs, size):
        return _normalise_in_numpy(imgs, mean, std)
    if not isinstance(imgs, np.ndarray) and len(imgs) > 1 and len({im.shape for im in imgs}) == 1:
        imgs = np.stack(imgs)  # one size (the usual predict request): one batched resize + normalise
    n = len(imgs)
    out = torch.empty((n, 3, *size), dtype=torch.float32)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def convert(batch: np.ndarray) -> torch.Tensor:
        t = _to_tensor(batch)
        if tuple(t.shape[-2:]) != size:
            t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (t - m) / s  # == (t / 255 - mean) / std

    if isinstance(imgs, np.ndarray):
        for start in range(0, n, _CHUNK):
            out[start : start + _CHUNK] = convert(imgs[start : start + _CHUNK])
    else:
        for i, im in enumerate(imgs):
            out[i] = convert(im[None])[0]
    return out


def _at_size(imgs: np.ndarray | list[np.ndarray], size: tuple[int, int]) -> bool:
    """A few uint8 images already at the input size (a predict request of thumbnails): no resize."""
    if len(imgs) == 0 or len(imgs) > _CHUNK:
        return False
    return all(im.dtype == np.uint8 and im.shape[-3:-1] == size and im.shape[-1] in (1, 3, 4) for im in imgs)


def _normalise_in_numpy(
    imgs: np.ndarray | list[np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """`preprocess` without a resize, in numpy: the same float32 operations, bit for bit, as the torch path,
    at about half its cost for a 32-pixel image (a dozen small torch calls cost more than the arithmetic)."""
    batch = imgs if isinstance(imgs, np.ndarray) else np.stack(imgs)  # [N, H, W, C] uint8
    if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
    m = np.asarray(mean, dtype=np.float32) * np.float32(255.0)
    s = np.asarray(std, dtype=np.float32) * np.float32(255.0)
    out = (batch[..., :3].astype(np.float32) - m) / s  # == (x / 255 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def split_train_val(ds: LoadedDataset, val_fraction: float, seed: int) -> LoadedDataset:
    """Move a stratified ``val_fraction`` of the training images into a validation split.

    Deterministic for a seed; every class keeps at least one training image; a dataset that already
    has a validation split (or ``val_fraction <= 0``) comes back unchanged.
    """
    if ds.val is not None or val_fraction <= 0:
        return ds
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = ds.train.labels
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    for cls in range(len(ds.classes)):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n_val = min(int(np.floor(len(members) * val_fraction + 0.5)), max(len(members) - 1, 0))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    tr = np.sort(np.concatenate(train_idx)) if train_idx else np.zeros(0, dtype=np.int64)
    va = np.sort(np.concatenate(val_idx)) if val_idx else np.zeros(0, dtype=np.int64)
    val: ImageSet | None = ds.train.subset(va) if len(va) else None
    report = dataclasses.replace(
        ds.report, num_train=len(tr), num_val=len(va), warnings=list(ds.report.warnings)
    )
    return LoadedDataset(list(ds.classes), ds.train.subset(tr), val, ds.test, report)
