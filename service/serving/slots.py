"""The device tier of the prompt cache: the slot table (mechanism) and the slot policy that fills it.

:class:`SlotTable` is the engine's preallocated PromptBank for one backbone+device, written by index; its
methods run on the batcher's model threads: passes side by side, a write only while no pass runs.
:class:`SlotPolicy` decides which prompt sits in which row (LRU over slots no running batch leases and
nobody pinned) and runs on the event loop, as LoRAX and vLLM keep the policy apart from the mechanism.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.engine import Backbone
from service.engine.artifacts import PromptArtifact
from service.engine.errors import MethodError
from service.engine.methods.lora import lora_targets
from service.engine.mixed_batch import PromptBank, forward_mixed_from
from service.serving import metrics
from service.serving.cache import CacheStats, LoadedPrompt
from service.serving.errors import PinLimitError

__all__ = ["LORA_RANK_BOUND", "SlotGrant", "SlotPolicy", "SlotTable", "slot_bytes"]

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


@dataclass(eq=False)
class _Resident:
    key: str
    slot: int
    generation: int
    nbytes: int
    leases: int = 0
    pinned: bool = False
    stale: bool = False  # invalidated while a batch leased it: its slot is freed on release


@dataclass
class SlotGrant:
    """Slots leased for one batch: ``slots[key]`` is the row of the slot table the key's rows gather.

    ``writes`` lists the (slot, prompt) pairs the model thread must write before the forward pass.
    """

    slots: dict[str, int] = field(default_factory=dict)
    writes: list[tuple[int, LoadedPrompt]] = field(default_factory=list)
    _leased: list[_Resident] = field(default_factory=list)


class SlotPolicy:
    """Which prompt sits in which device slot: LRU over unleased, unpinned slots; waits when all are busy.

    A slot leased by a batch (submitted to the model thread, not yet finished) is never evicted, so a
    forward pass never reads a row that changed under it. Acquisition is all-or-nothing per request, so a
    request either goes into this batch whole or waits for the next one; it is never failed for room.
    """

    def __init__(self, capacity: int, *, max_pinned: int, name: str = "default") -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_pinned = max(0, min(max_pinned, capacity - 1))
        self.name = name
        self._by_key: dict[str, _Resident] = {}
        self._evictable: OrderedDict[str, _Resident] = OrderedDict()  # unleased, unpinned; LRU first
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._released = asyncio.Event()
        self.resident_bytes = 0
        self.stats = CacheStats()

    # -- queries ----------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def pinned_count(self) -> int:
        return sum(1 for r in self._by_key.values() if r.pinned)

    @property
    def max_prompts_per_request(self) -> int:
        """The most distinct prompts one request may lease at once and still always fit eventually."""
        return self.capacity - self.max_pinned

    @property
    def leased(self) -> int:
        return sum(1 for r in self._by_key.values() if r.leases)

    # -- acquisition ------------------------------------------------------------------------------------
    def try_acquire(self, grant: SlotGrant, prompts: Sequence[LoadedPrompt]) -> bool:
        """Lease slots for every prompt into ``grant``, or for none of them (returns False: wait or defer)."""
        hits: dict[str, _Resident] = {}
        misses: dict[str, LoadedPrompt] = {}
        for p in prompts:
            if p.key in grant.slots or p.key in hits or p.key in misses:
                continue
            r = self._by_key.get(p.key)
            if r is not None and r.generation == p.generation:
                hits[p.key] = r
            else:
                misses[p.key] = p
        # leasing a hit takes it out of the evictable set, so it cannot make room for a miss
        hits_evictable = sum(1 for k in hits if k in self._evictable)
        if len(misses) > len(self._free) + len(self._evictable) - hits_evictable:
            return False
        for key, r in hits.items():
            self.stats.hits += 1
            metrics.CACHE_HITS.labels(tier="device").inc()
            self._lease(r)
            grant.slots[key] = r.slot
            grant._leased.append(r)
        for key, p in misses.items():
            old = self._by_key.get(key)
            if old is not None:  # an older generation sits here (defensive: invalidate removes it)
                self._drop(old)
            self.stats.misses += 1
            metrics.CACHE_MISSES.labels(tier="device").inc()
            r = self._place(p)
            grant.writes.append((r.slot, p))
            self._lease(r)
            grant.slots[key] = r.slot
            grant._leased.append(r)
        return True

    def _place(self, p: LoadedPrompt) -> _Resident:
        """A slot for a new resident: a free one, else the least recently used evictable one."""
        if self._free:
            slot = self._free.pop()
        else:
            _, victim = self._evictable.popitem(last=False)
            del self._by_key[victim.key]
            self.resident_bytes -= victim.nbytes
            slot = victim.slot
            self.stats.evictions += 1
            metrics.CACHE_EVICTIONS.labels(tier="device").inc()
        r = _Resident(key=p.key, slot=slot, generation=p.generation, nbytes=p.nbytes)
        self._by_key[p.key] = r
        self.resident_bytes += p.nbytes
        return r

    def _lease(self, r: _Resident) -> None:
        r.leases += 1
        self._evictable.pop(r.key, None)

    def release(self, grant: SlotGrant) -> None:
        """The batch finished (or failed): its slots may be evicted again, least recently used first."""
        for r in grant._leased:
            r.leases -= 1
            if r.leases == 0:
                if r.stale:
                    self._free.append(r.slot)
                elif not r.pinned and self._by_key.get(r.key) is r:
                    self._evictable[r.key] = r  # most recently used end
        grant._leased.clear()
        self._released.set()

    def forget(self, keys: Iterable[str]) -> None:
        """Drop keys whose slot write failed, so the next batch writes them again."""
        for key in keys:
            r = self._by_key.get(key)
            if r is not None:
                self._drop(r)

    async def wait_released(self) -> None:
        """Wait until some batch releases its slots (the caller then tries again)."""
        self._released.clear()
        await self._released.wait()

    # -- invalidation and pins --------------------------------------------------------------------------
    def invalidate(self, key: str) -> None:
        r = self._by_key.get(key)
        if r is not None:
            self._drop(r)

    def _drop(self, r: _Resident) -> None:
        del self._by_key[r.key]
        self._evictable.pop(r.key, None)
        self.resident_bytes -= r.nbytes
        if r.leases:
            r.stale = True
        else:
            self._free.append(r.slot)

    def pin(self, prompt: LoadedPrompt) -> tuple[int, bool]:
        """Pin ``prompt`` into a slot; returns (slot, whether the model thread must write it).

        Raises PinLimitError when ``max_pinned`` slots are pinned already or no slot can be had now.
        """
        r = self._by_key.get(prompt.key)
        if r is not None and r.generation == prompt.generation:
            if not r.pinned:
                if self.pinned_count >= self.max_pinned:
                    raise PinLimitError(f"at most {self.max_pinned} prompts may be pinned on {self.name}")
                r.pinned = True
                self._evictable.pop(r.key, None)
            return r.slot, False
        if self.pinned_count >= self.max_pinned:
            raise PinLimitError(f"at most {self.max_pinned} prompts may be pinned on {self.name}")
        if r is not None:
            self._drop(r)
        if not self._free and not self._evictable:
            raise PinLimitError(f"every slot on {self.name} is busy; try again")
        r = self._place(prompt)
        r.pinned = True
        return r.slot, True

    def unpin(self, key: str) -> bool:
        r = self._by_key.get(key)
        if r is None or not r.pinned:
            return False
        r.pinned = False
        if r.leases == 0:
            self._evictable[r.key] = r
        return True
