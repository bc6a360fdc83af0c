"""Norm-tune: learn each norm layer's affine transform (BN / LN / GN) plus the head.

Applied as `y * (1 + s) + t` on every norm module's output through `Backbone.run(norm_fn=...)`, which
equals tuning the module's own weight and bias (`(gamma * (1 + s)) x_hat + (beta * (1 + s) + t)`),
while the shared backbone stays untouched, so norm-tuned prompts are servable in a mixed batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from service.engine.errors import MethodError
from service.engine.methods.base import (
    MethodConfig,
    NormFn,
    PromptModule,
    _copy_into,
    norm_layer_segments,
)
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


def scale_key(name: str) -> str:
    return f"norm.{name}.scale"


def shift_key(name: str) -> str:
    return f"norm.{name}.shift"


def affine_view(v: Tensor, y: Tensor, channel_dim: int) -> Tensor:
    """Reshape a per-channel vector (or [B, C] rows) so it broadcasts against y at `channel_dim`."""
    if channel_dim == -1 or channel_dim == y.dim() - 1:
        return v if v.dim() == 1 else v.view(v.shape[0], *([1] * (y.dim() - 2)), v.shape[-1])
    trailing = [1] * (y.dim() - channel_dim - 1)
    if v.dim() == 1:
        return v.view(-1, *trailing)
    return v.view(v.shape[0], v.shape[1], *trailing)


def make_affine(backbone: Backbone) -> tuple[nn.ParameterList, nn.ParameterList]:
    """Zero-initialised (scales, shifts), one [C] pair per norm module of `backbone` (identity at start)."""
    if not backbone.norm_layers:
        raise MethodError(f"backbone {backbone.spec.model!r} has no norm layers to tune")
    dev = backbone.device
    scales = nn.ParameterList(
        [nn.Parameter(torch.zeros(n.num_features, device=dev)) for n in backbone.norm_layers]
    )
    shifts = nn.ParameterList(
        [nn.Parameter(torch.zeros(n.num_features, device=dev)) for n in backbone.norm_layers]
    )
    return scales, shifts


def norm_first_layer(backbone: Backbone) -> int:
    """Everything before the first segment that runs a norm module is frozen prefix."""
    segments = norm_layer_segments(backbone)
    used = [segments[n.name] for n in backbone.norm_layers if n.name in segments]
    return min(used) - 1 if used else backbone.pooled_index


def affine_norm_fn(backbone: Backbone, scales: nn.ParameterList, shifts: nn.ParameterList) -> NormFn:
    """The `norm_fn` that applies `y * (1 + s) + t` with the k-th pair at the k-th norm module."""
    index = {n.name: k for k, n in enumerate(backbone.norm_layers)}
    cdim = {n.name: n.channel_dim for n in backbone.norm_layers}

    def tune(name: str, y: Tensor) -> Tensor:
        k = index.get(name)
        if k is None:
            return y
        s = affine_view(scales[k], y, cdim[name])
        t = affine_view(shifts[k], y, cdim[name])
        return y * (1.0 + s) + t

    return tune


def export_affine(
    backbone: Backbone, scales: nn.ParameterList, shifts: nn.ParameterList
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, n in enumerate(backbone.norm_layers):
        out[scale_key(n.name)] = scales[k]
        out[shift_key(n.name)] = shifts[k]
    return out


def load_affine(
    backbone: Backbone, scales: nn.ParameterList, shifts: nn.ParameterList, tensors: Mapping[str, Tensor]
) -> None:
    for k, n in enumerate(backbone.norm_layers):
        _copy_into(scales[k], tensors, scale_key(n.name))
        _copy_into(shifts[k], tensors, shift_key(n.name))


@dataclass(frozen=True)
class NormConfig(MethodConfig):
    """`norm` takes no options besides num_classes (every norm layer is tuned)."""

    method: ClassVar[str] = "norm"


@register_method("norm")
class NormTune(PromptModule):
    """Per norm layer: scale s and shift t [C], zero-initialised (identity at start)."""

    config_class: ClassVar[type[MethodConfig]] = NormConfig

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__(backbone, config)
        self.scales, self.shifts = make_affine(backbone)
        self.first_layer = norm_first_layer(backbone)

    def norm_fn(self) -> NormFn | None:
        return affine_norm_fn(self.backbone, self.scales, self.shifts)

    def metadata(self) -> dict[str, Any]:
        return {"prompt_shape": None, "norm_layers": [n.name for n in self.backbone.norm_layers]}

    def _export_prompt(self) -> dict[str, Tensor]:
        return export_affine(self.backbone, self.scales, self.shifts)

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        load_affine(self.backbone, self.scales, self.shifts, tensors)
