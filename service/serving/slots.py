"""The slot table *mechanism*: the engine's preallocated PromptBank for one backbone+device, written by index.

Nothing here decides which prompt goes where (that is :class:`service.serving.cache.SlotPolicy`); this only
writes an artifact into row ``slot``, clears a row, and runs a mixed-prompt forward pass over rows that
gather their slot. Every method runs on the backbone's one model thread.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from service.engine import Backbone
from service.engine.artifacts import PromptArtifact
from service.engine.errors import MethodError
from service.engine.methods.lora import lora_targets
from service.engine.mixed_batch import PromptBank, forward_mixed_from

__all__ = ["LORA_RANK_BOUND", "SlotTable", "slot_bytes"]

#: The LoRA rank the per-slot byte bound assumes; a higher rank still loads (the bank's LoRA tables pad
#: to the largest rank resident), it only makes the bound an underestimate.
LORA_RANK_BOUND = 16


def slot_bytes(backbone: Backbone, max_classes: int) -> int:
    """Device bytes one slot can cost at most on ``backbone``: what sizes the table from a byte budget.

    A padded head plus the larger of what one prompt can hold besides: a full-shape delta at every layer of
    the catalog, the norm-tune affine of every norm module and a VP frame; or LoRA factors at
    ``LORA_RANK_BOUND`` on every module LoRA can adapt (a LoRA slot holds no delta). Float32 throughout.
    The bank's tables only hold rows for the prompts that use them, so real use is usually far below this
    bound (``SlotTable.device_bytes`` says how far).
    """
    head = max_classes * (backbone.num_features + 1)  # head W [Kmax, D] + b [Kmax]
    prompt = sum(math.prod(layer.shape) for layer in backbone.layers)  # deltas at every layer, input incl.
    prompt += sum(2 * n.num_features for n in backbone.norm_layers)  # norm scale + shift
    h, w = backbone.layers[0].shape[1:]
    prompt += 4 * h * w + 2  # VP frame [3, H, W] + keep [1, H, W] + scale [2]
    return 4 * (head + max(prompt, _lora_floats(backbone, LORA_RANK_BOUND)))


def _lora_floats(backbone: Backbone, rank: int) -> int:
    """Floats of rank-`rank` factors A [r, C_in * kh * kw] and B [C_out, r] on every adaptable module."""
    try:
        targets = set(lora_targets(backbone))
    except MethodError:  # nothing LoRA can adapt on this backbone
        return 0
    total = 0
    for name, module in backbone.model.named_modules():
        if name in targets:
            weight = module.weight  # [C_out, C_in, kh, kw] / [D_out, D_in]
            total += rank * (weight[0].numel() + weight.shape[0])
    return total


class SlotTable:
    """A backbone's prompt slot table: ``capacity`` rows of deltas + heads, written by index."""

    def __init__(self, backbone: Backbone, capacity: int, max_classes: int) -> None:
        self.backbone = backbone
        self.capacity = capacity
        self.max_classes = max_classes
        self.bank = PromptBank(backbone, capacity, max_classes)

    @property
    def device_bytes(self) -> int:
        """Bytes the bank holds now (its per-layer tables grow as new layers come into use)."""
        return int(self.bank.nbytes)

    def write(self, slot: int, artifact: PromptArtifact) -> int:
        """Write ``artifact`` into row ``slot``; returns the bytes it occupies there."""
        return int(self.bank.write(slot, artifact))

    def clear(self, slot: int) -> None:
        self.bank.clear(slot)

    @torch.inference_mode()
    def forward(self, x: Tensor, slots: Tensor, image_index: Tensor | None) -> Tensor:
        """x [M, 3, H, W] distinct images; slots [B]; image_index [B] or None -> logits [B, max_classes].

        The backbone up to the earliest prompt layer of the batch runs once per distinct image; only then
        are rows that share an image (one request, several prompts) expanded by ``image_index``.
        """
        bb = self.backbone
        host = [int(s) for s in slots.tolist()]
        start = self.bank.first_layer(host)
        h = x.to(bb.device, non_blocking=True)
        if start > 0:
            h = bb.run(h, 0, start)  # [M, *shape_start]
        if image_index is not None:
            h = h.index_select(0, image_index.to(bb.device))  # [B, *shape_start]
        return forward_mixed_from(bb, self.bank, h, start, host)  # [B, max_classes]
