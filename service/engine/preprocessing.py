"""How decoded images become a backbone's input, as data: chosen from the backbone, recorded in each
artifact, and read back by whoever serves or evaluates the artifact, so an image is prepared exactly as
it was in training.

Two pipelines:
- ``timm_eval``: timm's own eval transform (`timm.data.create_transform(is_training=False)`) with the
  backbone's pretrained data config (`timm.data.resolve_data_config`): resize the shorter side to
  ``input / crop_pct`` with the config's interpolation, centre-crop to the input size, normalise. Used by
  every backbone with pretrained weights (hub or a checkpoint file) for which timm has a pretrained data
  config: the weights were trained on images prepared that way.
- ``resize``: a bilinear, antialiased resize of the whole image to the input size, then normalise
  (`datasets.transforms.preprocess`). The CIFAR backbones (trained on 32x32 images) use it, so do
  randomly initialised backbones (no pretraining to match), and so does any artifact that predates the
  record.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from service.engine.backbone_spec import BackboneSpec
from service.engine.datasets.transforms import preprocess
from service.engine.errors import BackboneError

Pipeline = Literal["resize", "timm_eval"]
#: Models of ours (registered in timm's registry by `service.engine.models`): they keep `resize`.
_OWN_MODELS_MODULE = "service.engine.models"


@dataclass(frozen=True)
class Preprocessing:
    """One image pipeline, complete enough to repeat bit for bit; `__call__` applies it to a batch."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pipeline: Pipeline = "resize"
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded uint8 HWC images (1, 3 or 4 channels) -> normalised float32 [N, 3, H, W]."""
        if self.pipeline == "resize":
            return preprocess(images, self.input_size, self.mean, self.std)
        transform = _timm_transform(self)
        rows = [transform(_rgb(im)) for im in images]
        if not rows:
            return torch.empty((0, 3, *self.input_size), dtype=torch.float32)
        return torch.stack(rows).to(torch.float32)  # [N, 3, H, W]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """A record without `pipeline` (an older artifact) is the `resize` pipeline it was trained with."""
        size, mean, std = data["input_size"], data["mean"], data["std"]
        return cls(
            input_size=(int(size[0]), int(size[1])),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            pipeline="timm_eval" if data.get("pipeline") == "timm_eval" else "resize",
            interpolation=str(data.get("interpolation", "bilinear")),
            crop_pct=float(data.get("crop_pct", 1.0)),
            crop_mode=str(data.get("crop_mode", "center")),
        )


def preprocessing_for(spec: BackboneSpec) -> Preprocessing:
    """The pipeline a backbone trains and serves with: timm's eval pipeline for pretrained weights that
    timm has a data config for (the spec's own input size, mean and std still win), else `resize`."""
    import timm
    from timm.data import resolve_data_config

    resolved = spec.resolved()
    if resolved.input_size is None or resolved.mean is None or resolved.std is None:
        raise BackboneError(f"{spec.model!r}: no input size, mean and std to preprocess with")
    base = Preprocessing(resolved.input_size, resolved.mean, resolved.std)
    cfg = timm.models.get_pretrained_cfg(spec.model)
    entrypoint = timm.models.model_entrypoint(spec.model.split(".", 1)[0])
    if spec.weights == "random" or cfg is None or entrypoint.__module__.startswith(_OWN_MODELS_MODULE):
        return base
    args = {"input_size": (3, *resolved.input_size), "mean": resolved.mean, "std": resolved.std}
    config = resolve_data_config(args, pretrained_cfg=cfg.to_dict())
    return Preprocessing(
        resolved.input_size,
        resolved.mean,
        resolved.std,
        pipeline="timm_eval",
        interpolation=str(config["interpolation"]),
        crop_pct=float(config["crop_pct"]),
        crop_mode=str(config["crop_mode"]),
    )


@functools.lru_cache(maxsize=32)
def _timm_transform(p: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    from timm.data import create_transform

    transform: Callable[[Image.Image], torch.Tensor] = create_transform(
        input_size=(3, *p.input_size),
        is_training=False,
        interpolation=p.interpolation,
        mean=p.mean,
        std=p.std,
        crop_pct=p.crop_pct,
        crop_mode=p.crop_mode,
    )
    return transform


def _rgb(image: np.ndarray) -> Image.Image:
    """A decoded HWC (or HW) array as an RGB PIL image: gray repeated, alpha dropped (as `resize` does)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ValueError(f"images need 1, 3 or 4 channels, got {arr.shape[-1]}")
    return Image.fromarray(arr).convert("RGB")
