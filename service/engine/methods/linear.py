"""Linear probe: only the head on the frozen pooled features trains (the cheapest baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.engine.methods.base import MethodConfig, PromptModule
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


@register_method("linear")
class LinearProbe(PromptModule):
    """Head only; the whole backbone is prefix, so its pooled features can be cached once."""

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__(backbone, config)
        self.first_layer = backbone.pooled_index
