"""LoRA (Hu et al. 2021) through the real `peft` library: the baseline users would pick first.

A low-rank update `W + B A` (rank r, B zero-initialised) on every ungrouped convolution of a CNN
(depthwise ones excluded: peft cannot adapt them at small ranks), or on the
attention and MLP linears (qkv / proj / fc1 / fc2) of a ViT's blocks. peft rewrites modules in place,
so the method works on a private copy of the backbone (the shared one is never touched) and, like
`full`, cannot share a serving pass: a benchmark baseline, not a servable method. The copy stays in
eval mode (BN statistics frozen, as in the reference runs); only the LoRA factors and the head train.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from service.engine.errors import MethodError
from service.engine.methods.base import MethodConfig, PromptModule, _copy_into
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

#: ViT linears LoRA adapts: attention (qkv, proj) and MLP (fc1, fc2) inside the transformer blocks.
_VIT_TARGET = re.compile(r"(^|\.)blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$")


def lora_targets(backbone: Backbone) -> list[str]:
    """Module names LoRA adapts: every (ungrouped) Conv2d of a CNN, the block linears of a ViT."""
    names = []
    for name, module in backbone.model.named_modules():
        if backbone.family == "vit":
            if isinstance(module, nn.Linear) and _VIT_TARGET.search(name):
                names.append(name)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            names.append(name)  # depthwise / grouped convs: peft needs rank % groups == 0; skipped
    if not names:
        raise MethodError(f"backbone {backbone.spec.model!r} has no module LoRA can adapt")
    return names


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """Options of `lora` (named apart from peft's own `LoraConfig`, which the module builds from it).

    Attributes:
        lora_rank: rank r of every low-rank update (alpha = r, so the scale is 1).
    """

    method: ClassVar[str] = "lora"
    lora_rank: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise MethodError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")


@register_method("lora")
class LoRA(PromptModule):
    """peft LoRA adapters (rank r, alpha = r) on a private copy of the backbone, plus the head."""

    servable: ClassVar[bool] = False
    config_class: ClassVar[type[MethodConfig]] = LoRAConfig
    config: LoRAConfig

    def __init__(self, backbone: Backbone, config: LoRAConfig) -> None:
        super().__init__(backbone, config)
        from peft import LoraConfig, inject_adapter_in_model

        from service.engine.backbones import Backbone as _Backbone

        model = copy.deepcopy(backbone.model)
        self.targets = lora_targets(backbone)
        rank = config.lora_rank
        # Full module names, anchored: peft matches a name or a ".name" suffix, so no other module fits.
        lora_cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=self.targets)
        model = inject_adapter_in_model(lora_cfg, model)
        model.to(backbone.device)
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        self._copy = _Backbone(backbone.spec, model, backbone.device)
        self.model = model  # registered: its LoRA factors are this module's trainable parameters
        self.first_layer = 0

    @property
    def run_backbone(self) -> Backbone:
        return self._copy

    def train(self, mode: bool = True) -> LoRA:
        """Train the head and adapters, but keep the copied backbone in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.model.eval()
        return self

    def metadata(self) -> dict[str, Any]:
        return {"prompt_shape": None, "lora_rank": self.config.lora_rank, "lora_targets": self.targets}

    def _lora_tensors(self) -> dict[str, nn.Parameter]:
        return {f"lora.{k}": p for k, p in self.model.named_parameters() if "lora_" in k}

    def _export_prompt(self) -> dict[str, Tensor]:
        return dict(self._lora_tensors())

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        for key, p in self._lora_tensors().items():
            _copy_into(p, tensors, key)
