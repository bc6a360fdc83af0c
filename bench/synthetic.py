"""Random, untrained prompt artifacts for benchmarks and tests: real artifacts, built through the engine.

Serving cost does not depend on what a prompt learned, only on its layer, shape and head, so the serving
benchmark and tests import random deltas and heads instead of training thousands of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.engine import Backbone
from service.engine.artifacts import PromptArtifact
from service.engine.methods import MethodConfig, create_method

__all__ = ["random_artifact", "random_lora_artifacts"]


def random_artifact(
    backbone: Backbone,
    *,
    layers: Sequence[int],
    num_classes: int = 10,
    seed: int = 0,
    method: str = "activation",
    prompt_shape: str = "full",
    scale: float = 0.5,
) -> PromptArtifact:
    """An artifact whose prompt tensors and head are N(0, scale^2) noise (seeded), not trained."""
    config = MethodConfig.for_method(
        method, num_classes=num_classes, prompt_layers=tuple(layers), prompt_shape=prompt_shape
    )
    module = create_method(method, backbone, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    classes = [f"class_{seed}_{i}" for i in range(num_classes)]
    return PromptArtifact.from_module(module, classes=classes, metrics={"synthetic": True})


def random_lora_artifacts(
    backbone: Backbone,
    n: int,
    *,
    rank: int = 4,
    num_classes: int = 10,
    seed: int = 0,
    scale: float = 0.02,
) -> list[PromptArtifact]:
    """n LoRA artifacts with seeded N(0, scale^2) factors (B too, so every update acts) and heads.

    One module (one peft copy of the backbone) is refilled for each artifact: building 32 copies of a
    224-px backbone would cost more than the benchmark it feeds.
    """
    from service.engine.methods import LoRAConfig

    module = create_method("lora", backbone, LoRAConfig(num_classes, lora_rank=rank))
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in module.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        classes = [f"class_{seed + i}_{k}" for k in range(num_classes)]
        out.append(PromptArtifact.from_module(module, classes=classes, metrics={"synthetic": True}))
    return out
