"""Prompt layers as data: a timm model cut into a chain of segments, and the catalog that names them.

Layer 0 is the (normalised) input image, layer 1 the stem / patch-embedding output, layers 2..L every
block output, and the "layer" L+1 the pooled features the head reads. Segment i maps the activation
at layer i-1 to the activation at layer i, so a prompt at layer k is "run segments 1..k, add, run the
rest". The cut is derived per *family* (ResNet-like, ViT-like, ConvNeXt-like, EfficientNet-like) from
timm's attribute conventions; no model has a hand-written table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.engine.errors import LayerError

Segment = Callable[[torch.Tensor], torch.Tensor]

#: Where in the depth the recommended prompt layer sits, per family (fraction of the block outputs).
#: CNNs: a late block; ViTs: an early block (the paper's priors; `bench/accuracy.py` measures them).
RECOMMENDED_DEPTH = {"cnn": 0.75, "vit": 0.25}


@dataclass(frozen=True)
class LayerInfo:
    """One place a prompt can be added."""

    index: int
    name: str
    kind: str  # "input" | "stem" | "block"
    shape: tuple[int, ...]  # without batch: (C, H, W) for CNNs, (tokens, D) for ViTs
    full_params: int
    channel_params: int
    family: str  # "cnn" | "vit"
    recommended: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "full_params": self.full_params,
            "channel_params": self.channel_params,
            "family": self.family,
            "recommended": self.recommended,
        }


@dataclass(frozen=True)
class NormLayerInfo:
    """A norm module whose output norm-tune rescales: `y * (1 + s) + t` along `channel_dim`."""

    name: str
    kind: str  # "bn" | "ln" | "gn"
    num_features: int
    channel_dim: int  # 1 for NCHW batch/group/2d-layer norms, -1 for token/channels-last LayerNorm
    layer_index: int  # the catalog layer whose segment contains it (L+1 = the pooling segment)


@dataclass(frozen=True)
class Decomposition:
    """A model as segments: `segments[i-1]` produces layer i (1..L); `pool` produces the features."""

    family: str
    names: tuple[str, ...]  # module path of each layer 1..L
    kinds: tuple[str, ...]
    segments: tuple[Segment, ...]
    pool: Segment


def _seq(*fns: Callable[[torch.Tensor], torch.Tensor]) -> Segment:
    def run(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return run


def _block_list(container: nn.Module, prefix: str) -> list[tuple[str, Segment]]:
    return [(f"{prefix}.{name}", block) for name, block in container.named_children()]


def _decomposition(
    family: str, stem: tuple[str, Segment], blocks: Sequence[tuple[str, Segment]], pool: Segment
) -> Decomposition:
    """Layer 1 is the stem, each block's output a layer after it."""
    layers = [stem, *blocks]
    return Decomposition(
        family,
        tuple(name for name, _ in layers),
        ("stem", *("block" for _ in blocks)),
        tuple(segment for _, segment in layers),
        pool,
    )


def _decompose_resnet(model: Any) -> Decomposition:
    stem_mods = [getattr(model, a) for a in ("conv1", "bn1", "act1", "maxpool") if hasattr(model, a)]
    stem_name = next(a for a in ("maxpool", "act1", "bn1", "conv1") if hasattr(model, a))
    blocks: list[tuple[str, Segment]] = []
    stage = 1
    while hasattr(model, f"layer{stage}"):
        blocks += _block_list(getattr(model, f"layer{stage}"), f"layer{stage}")
        stage += 1

    def pool(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(x, pre_logits=True)

    return _decomposition("cnn", (stem_name, _seq(*stem_mods)), blocks, pool)


def _decompose_vit(model: Any) -> Decomposition:
    def stem(x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def pool(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(x), pre_logits=True)

    return _decomposition("vit", ("patch_embed", stem), _block_list(model.blocks, "blocks"), pool)


def _decompose_convnext(model: Any) -> Decomposition:
    blocks: list[tuple[str, Segment]] = []
    for s, stage in enumerate(model.stages):
        for b, (name, block) in enumerate(_block_list(stage.blocks, f"stages.{s}.blocks")):
            # The stage's downsample runs in front of its first block: part of that block's segment.
            blocks.append((name, _seq(stage.downsample, block) if b == 0 else block))

    def pool(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm_pre(x), pre_logits=True)

    return _decomposition("cnn", ("stem", model.stem), blocks, pool)


def _decompose_efficientnet(model: Any) -> Decomposition:
    blocks = [block for s, stage in enumerate(model.blocks) for block in _block_list(stage, f"blocks.{s}")]
    if hasattr(model, "bn2"):  # EfficientNet: conv_head + bn2 belong to forward_features
        pool = _seq(model.conv_head, model.bn2, lambda x: model.forward_head(x, pre_logits=True))
    else:  # MobileNetV3: conv_head sits inside forward_head, after pooling
        pool = _seq(lambda x: model.forward_head(x, pre_logits=True))
    return _decomposition("cnn", ("bn1", _seq(model.conv_stem, model.bn1)), blocks, pool)


def decompose(model: nn.Module) -> Decomposition:
    """Cut a timm model into prompt-layer segments by its family's attribute conventions.

    Raises:
        LayerError: the model belongs to no family this engine knows how to cut.
    """
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "_pos_embed"):
        return _decompose_vit(model)
    if hasattr(model, "layer1") and hasattr(model, "conv1"):
        return _decompose_resnet(model)
    stages: Any = getattr(model, "stages", None)
    if stages is not None and hasattr(model, "stem") and hasattr(stages[0], "blocks"):
        return _decompose_convnext(model)
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):
        return _decompose_efficientnet(model)
    raise LayerError(
        f"model {type(model).__name__} is not a supported family "
        "(ResNet, ConvNeXt, EfficientNet/MobileNet, ViT/DeiT)",
        param="backbone",
    )


def build_catalog(decomposition: Decomposition, shapes: Sequence[tuple[int, ...]]) -> list[LayerInfo]:
    """The catalog for layers 0..L, given each layer's activation shape (without batch)."""
    family = decomposition.family
    block_indices = [i + 1 for i, kind in enumerate(decomposition.kinds) if kind == "block"]
    position = min(len(block_indices) - 1, math.floor(RECOMMENDED_DEPTH[family] * len(block_indices)))
    recommended = block_indices[position] if block_indices else 1
    names = ("input", *decomposition.names)
    kinds = ("input", *decomposition.kinds)
    catalog = []
    for index, (name, kind, shape) in enumerate(zip(names, kinds, shapes, strict=True)):
        channels = shape[0] if (family == "cnn" or index == 0) else shape[-1]
        catalog.append(
            LayerInfo(
                index=index,
                name=name,
                kind=kind,
                shape=tuple(shape),
                full_params=math.prod(shape),
                channel_params=channels,
                family=family,
                recommended=index == recommended,
            )
        )
    return catalog


def channel_shape(layer: LayerInfo) -> tuple[int, ...]:
    """The broadcastable shape of a `channel` prompt at this layer: (C, 1, 1) or (1, D)."""
    if layer.family == "cnn" or layer.index == 0:
        return (layer.shape[0],) + (1,) * (len(layer.shape) - 1)
    return (1,) * (len(layer.shape) - 1) + (layer.shape[-1],)


def recommended_layer(layers: Sequence[LayerInfo]) -> int:
    return next(layer.index for layer in layers if layer.recommended)


def _resolve_one(layers: Sequence[LayerInfo], value: int | str) -> int:
    if isinstance(value, bool):
        raise LayerError(f"prompt_layer must be an index or a layer name, got {value!r}")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if 0 <= value < len(layers):
            return value
        raise LayerError(
            f"prompt_layer {value} is out of range: this backbone has layers 0..{len(layers) - 1}"
        )
    for layer in layers:
        if layer.name == value:
            return layer.index
    sample = ", ".join(layer.name for layer in layers[:6])
    raise LayerError(f"unknown prompt_layer {value!r}; layers are named like: {sample}, …")


def resolve_prompt_layers(
    layers: Sequence[LayerInfo], value: int | str | Sequence[int | str]
) -> tuple[int, ...]:
    """Turn a request's `prompt_layer` into sorted, unique catalog indices.

    Accepts an index, a layer name, a list of those, or "all" (every block output, "deep AP").
    "auto" is a search, not a name: `layer_search.auto_select_layer` resolves it.

    Raises:
        LayerError: naming the value that is not in the catalog.
    """
    if isinstance(value, str) and value == "all":
        return tuple(layer.index for layer in layers if layer.kind == "block")
    if isinstance(value, str) and value == "auto":
        raise LayerError("prompt_layer 'auto' must be resolved by a layer search before training")
    if isinstance(value, str | int):
        return (_resolve_one(layers, value),)
    if not isinstance(value, Sequence) or len(value) == 0:
        raise LayerError(
            "prompt_layer must be an index, a layer name, a non-empty list of them, 'all' or 'auto'"
        )
    return tuple(sorted({_resolve_one(layers, v) for v in value}))
