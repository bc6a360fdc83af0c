"""Activation prompting (AP): a learned, input-independent tensor added to an intermediate activation.

AP at layer 0 is additive visual prompting; at a deeper layer only the blocks after the prompt need
autograd, which is why deep prompts train cheaper. Several layers at once ("deep AP", `all`) = one
zero-initialised delta per listed layer. Shape "full" = the activation's shape; "channel" = one value
per channel (CNN, broadcast over H, W) or per feature (ViT, broadcast over tokens), i.e. a bias tune.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from service.engine.errors import LayerError, MethodError
from service.engine.layers import channel_shape
from service.engine.methods.base import LayerFn, MethodConfig, PromptModule, _copy_into
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


PROMPT_SHAPES = ("full", "channel")


@dataclass(frozen=True)
class ActivationConfig(MethodConfig):
    """Options of `activation` (AP).

    Attributes:
        prompt_layers: layer indices of the prompt (already resolved; several = deep AP).
        prompt_shape: "full" (the activation's shape) or "channel" (one value per channel / feature).
    """

    method: ClassVar[str] = "activation"
    prompt_layers: tuple[int, ...] = ()
    prompt_shape: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_shape not in PROMPT_SHAPES:
            raise MethodError(f"prompt_shape must be one of {PROMPT_SHAPES}, got {self.prompt_shape!r}")
        object.__setattr__(self, "prompt_layers", tuple(int(i) for i in self.prompt_layers))


def delta_key(layer: int) -> str:
    """Artifact tensor name of the delta at `layer`."""
    return f"delta.{layer}"


@register_method("activation")
class ActivationPrompt(PromptModule):
    """`h_l <- h_l + P_l` at every prompt layer l (zero-initialised)."""

    config_class: ClassVar[type[MethodConfig]] = ActivationConfig
    config: ActivationConfig

    def __init__(self, backbone: Backbone, config: ActivationConfig) -> None:
        super().__init__(backbone, config)
        if not config.prompt_layers:
            raise MethodError("method 'activation' needs at least one prompt layer")
        last = len(backbone.layers) - 1
        for i in config.prompt_layers:
            if not 0 <= i <= last:
                raise LayerError(f"prompt layer {i} is not in the catalog (0..{last})")
        self._layers = tuple(sorted(set(config.prompt_layers)))
        self.deltas = nn.ParameterDict()
        for i in self._layers:
            info = backbone.layers[i]
            shape = channel_shape(info) if config.prompt_shape == "channel" else tuple(info.shape)
            self.deltas[str(i)] = nn.Parameter(torch.zeros(shape, device=backbone.device))
        self.first_layer = self._layers[0]

    @property
    def prompt_layers(self) -> tuple[int, ...]:
        return self._layers

    def enter(self, h: Tensor) -> Tensor:
        return h + self.deltas[str(self.first_layer)]

    def layer_fn(self) -> LayerFn | None:
        deltas = self.deltas

        def add_delta(i: int, h: Tensor) -> Tensor:
            key = str(i)
            return h + deltas[key] if key in deltas else h

        return add_delta

    def metadata(self) -> dict[str, Any]:
        return {"prompt_shape": self.config.prompt_shape}

    def _export_prompt(self) -> dict[str, Tensor]:
        return {delta_key(i): self.deltas[str(i)] for i in self._layers}

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        for i in self._layers:
            _copy_into(self.deltas[str(i)], tensors, delta_key(i))
