"""Frozen-prefix activations computed once and reused every epoch (no augmentation only).

With a deep prompt most of the forward pass lies before the prompt and never changes, so epochs after
the first pay only for the part after it. Filled lazily during the first epoch (so that epoch carries
the cost it really has), bounded in bytes: rows beyond the bound are recomputed every time, with the
same function, so the numbers do not depend on whether a row was cached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class FeatureCache:
    """Activations `prefix(x[i])` for the rows of x, the first `capacity` of them kept on `device`."""

    def __init__(
        self, prefix: Callable[[Tensor], Tensor], x: Tensor, *, max_bytes: int, device: torch.device
    ) -> None:
        self._prefix = prefix
        self._x = x  # [N, 3, H, W], usually on the CPU
        self._device = device
        self._max_bytes = max(0, int(max_bytes))
        self._store: Tensor | None = None  # [capacity, *activation shape]
        self._filled: Tensor | None = None  # [capacity] bool
        self.capacity = 0  # rows that may be cached (known after the first batch)

    @property
    def nbytes(self) -> int:
        s = self._store
        return 0 if s is None else s.numel() * s.element_size()

    def _compute(self, idx: Tensor) -> Tensor:
        with torch.no_grad():
            return self._prefix(self._x[idx].to(self._device, non_blocking=True))

    def _allocate(self, sample: Tensor) -> None:
        row_bytes = sample[0].numel() * sample.element_size()
        self.capacity = min(len(self._x), self._max_bytes // max(1, row_bytes))
        if self.capacity == 0:
            self._max_bytes = 0  # not even one row fits: plain recomputation from now on
            return
        self._store = torch.empty((self.capacity, *sample.shape[1:]), dtype=sample.dtype, device=self._device)
        self._filled = torch.zeros(self.capacity, dtype=torch.bool)  # CPU: no device sync to test it

    def _put(self, idx: Tensor, rows: Tensor) -> None:
        store, filled = self._store, self._filled
        if store is None or filled is None:
            return
        keep = idx < self.capacity
        if bool(keep.any()):
            store[idx[keep].to(self._device)] = rows[keep.to(self._device)]
            filled[idx[keep]] = True

    def get(self, idx: Tensor) -> Tensor:
        """Activations for rows `idx` [B] (int64, CPU) -> [B, *shape] on the device."""
        if self._max_bytes == 0:
            return self._compute(idx)
        store, filled = self._store, self._filled
        if store is None or filled is None:  # first batch: learn the row size, then cache
            out = self._compute(idx)
            self._allocate(out)
            self._put(idx, out)
            return out
        cacheable = idx < self.capacity  # [B] bool
        hit = cacheable.clone()
        hit[cacheable] = filled[idx[cacheable]]
        if bool(hit.all()):
            return store[idx.to(self._device)]  # the steady state: one gather, no backbone
        miss = ~hit
        computed = self._compute(idx[miss])
        self._put(idx[miss], computed)
        if not bool(hit.any()):
            return computed
        out = torch.empty((len(idx), *computed.shape[1:]), dtype=computed.dtype, device=self._device)
        out[miss.to(self._device)] = computed
        out[hit.to(self._device)] = store[idx[hit].to(self._device)]
        return out
