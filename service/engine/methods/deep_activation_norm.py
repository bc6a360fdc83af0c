"""Deep AP + norm-tune: a delta at every block output and the norm affine, trained jointly.

Both parts act on the shared backbone only from the outside (`layer_fn` adds the deltas, `norm_fn`
rescales each norm output as `y * (1 + s) + t`), so the method stays servable: the mixed batch gathers
both per row. Without explicit prompt layers the deltas sit at every block output ("all").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from service.engine.layers import resolve_prompt_layers
from service.engine.methods.activation import ActivationConfig, ActivationPrompt
from service.engine.methods.base import MethodConfig, NormFn
from service.engine.methods.norm import (
    affine_norm_fn,
    export_affine,
    load_affine,
    make_affine,
    norm_first_layer,
)
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


@dataclass(frozen=True)
class DeepActivationNormConfig(ActivationConfig):
    """Options of `deep_activation_norm`: AP's (no prompt layers = every block output, resolved at build)."""

    method: ClassVar[str] = "deep_activation_norm"


@register_method("deep_activation_norm")
class DeepActivationNorm(ActivationPrompt):
    """`h_l <- h_l + P_l` at every prompt layer and `y_n <- y_n * (1 + S_n) + T_n` at every norm n."""

    default_prompt_layer: ClassVar[str | None] = "all"
    config_class: ClassVar[type[MethodConfig]] = DeepActivationNormConfig

    def __init__(self, backbone: Backbone, config: ActivationConfig) -> None:
        if isinstance(config, DeepActivationNormConfig) and not config.prompt_layers:
            config = replace(config, prompt_layers=resolve_prompt_layers(backbone.layers, "all"))
        super().__init__(backbone, config)
        self.scales, self.shifts = make_affine(backbone)
        self.first_layer = min(self.first_layer, norm_first_layer(backbone))

    def enter(self, h: Tensor) -> Tensor:
        key = str(self.first_layer)
        return h + self.deltas[key] if key in self.deltas else h

    def norm_fn(self) -> NormFn | None:
        return affine_norm_fn(self.backbone, self.scales, self.shifts)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "norm_layers": [n.name for n in self.backbone.norm_layers]}

    def _export_prompt(self) -> dict[str, Tensor]:
        return {**super()._export_prompt(), **export_affine(self.backbone, self.scales, self.shifts)}

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        super()._load_prompt(tensors)
        load_affine(self.backbone, self.scales, self.shifts, tensors)
