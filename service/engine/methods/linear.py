"""Linear probe: only the head on the frozen pooled features trains (the cheapest baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from service.engine.methods.base import MethodConfig, PromptModule
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


@dataclass(frozen=True)
class LinearConfig(MethodConfig):
    """`linear` takes no options besides num_classes."""

    method: ClassVar[str] = "linear"


@register_method("linear")
class LinearProbe(PromptModule):
    """Head only; the whole backbone is prefix, so its pooled features can be cached once."""

    config_class: ClassVar[type[MethodConfig]] = LinearConfig

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__(backbone, config)
        self.first_layer = backbone.pooled_index
