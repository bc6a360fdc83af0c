"""What a backbone is, without torch: a timm name, a weights source and its preprocessing.

Kept apart from `service.engine.backbones` (which builds the model, and so imports torch) so that the
use cases and the gateway can name a backbone without loading torch. Only `resolved()` (and
`spec_hash()`, which resolves) asks timm, and imports it then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from service.engine.errors import BackboneError


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: enough to rebuild it bit for bit on any worker."""

    model: str
    weights: str = "random"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not (self.weights in ("hub", "random") or self.weights.startswith("file://")):
            raise BackboneError(
                f"weights must be 'hub', 'random' or a file:// URI, got {self.weights!r}", param="weights"
            )

    def resolved(self) -> BackboneSpec:
        """Fill input size and mean/std from timm's pretrained config (no weights are loaded)."""
        import timm  # imports torch: only here, so naming a spec stays light

        import service.engine.models  # noqa: F401  (registers the CIFAR models in timm's registry)

        base_name = self.model.split(".", 1)[0]
        if not timm.is_model(base_name):
            raise BackboneError(f"unknown timm model {self.model!r}", param="model")
        cfg = timm.models.get_pretrained_cfg(self.model)
        size = self.input_size
        if size is None:
            img_size = self.model_kwargs.get("img_size")
            if img_size is not None:
                size = (
                    (img_size, img_size)
                    if isinstance(img_size, int)
                    else (int(img_size[0]), int(img_size[1]))
                )
            elif cfg is not None:
                size = (int(cfg.input_size[1]), int(cfg.input_size[2]))
            else:
                size = (224, 224)
        mean = self.mean or (tuple(cfg.mean) if cfg is not None else (0.485, 0.456, 0.406))
        std = self.std or (tuple(cfg.std) if cfg is not None else (0.229, 0.224, 0.225))
        return replace(
            self,
            input_size=(int(size[0]), int(size[1])),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            model_kwargs=dict(self.model_kwargs),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": self.weights,
            "model_kwargs": dict(self.model_kwargs),
            "input_size": list(self.input_size) if self.input_size else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        def triple(v: Any) -> tuple[float, float, float] | None:
            return None if v is None else (float(v[0]), float(v[1]), float(v[2]))

        size = data.get("input_size")
        return cls(
            model=str(data["model"]),
            weights=str(data.get("weights", "random")),
            model_kwargs=dict(data.get("model_kwargs") or {}),
            input_size=None if size is None else (int(size[0]), int(size[1])),
            mean=triple(data.get("mean")),
            std=triple(data.get("std")),
        )

    def spec_hash(self) -> str:
        """Identity of the backbone an artifact was trained on (canonical JSON of the resolved spec)."""
        canonical = json.dumps(self.resolved().to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
