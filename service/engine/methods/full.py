"""Full fine-tuning: every backbone weight trains. The benchmark's accuracy ceiling only.

It deep-copies the backbone (the shared one is never touched), so it cannot share a serving pass and
is not servable; its artifact carries the whole model state. Like every other method it sees the
backbone with its normalisation statistics frozen (BN in eval mode): batch statistics from a small
fine-tuning batch replace the pretrained ones, which wrecks a backbone whose BN was folded into its
convolutions (the TFLite MobileNetV2: running mean 0, variance 1) and is what the reference run avoids.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from service.engine.errors import ArtifactError
from service.engine.methods.base import MethodConfig, PromptModule
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    """`full` takes no options besides num_classes."""

    method: ClassVar[str] = "full"


@register_method("full")
class FullFineTune(PromptModule):
    """A private copy of the backbone whose weights all train, plus the head."""

    servable: ClassVar[bool] = False
    config_class: ClassVar[type[MethodConfig]] = FullConfig

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__(backbone, config)
        from service.engine.backbones import Backbone as _Backbone

        # A private model copy, staged like the shared one; the shared backbone is never written.
        self._copy = _Backbone(backbone.spec, copy.deepcopy(backbone.model), backbone.device)
        self.model = self._copy.model  # registered: its weights are trainable parameters here
        self.model.requires_grad_(True)
        self.first_layer = 0

    @property
    def run_backbone(self) -> Backbone:
        return self._copy

    def train(self, mode: bool = True) -> FullFineTune:
        """Every weight trains, but the copy stays in eval mode: BN statistics frozen, dropout off."""
        super().train(mode)
        self.model.eval()
        return self

    def _export_prompt(self) -> dict[str, Tensor]:
        return {f"model.{k}": v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        own = self.model.state_dict()
        missing = [k for k, v in own.items() if v.is_floating_point() and k not in state]
        if missing:
            raise ArtifactError(f"artifact lacks model tensors, e.g. {missing[:3]}")
        self.model.load_state_dict(state, strict=False)
