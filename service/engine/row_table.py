"""A growable table of per-slot rows behind an indirection (slot -> row; row 0 holds the default).

The storage under every per-slot tensor of the mixed batch that only some prompts use (AP deltas per
layer, VP frames, LoRA factors per module): memory grows with the prompts that use a table, not with
the bank's capacity.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RowTable:
    """A growable table of per-slot rows behind an indirection: slot -> row, row 0 = the default.

    Only slots that actually use this table hold a row, so a layer's delta table costs memory in
    proportion to the prompts at that layer, not to the bank's capacity. Rows are recycled on clear;
    the table doubles when full (on write, never on the forward path).
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], fill: float, device: torch.device) -> None:
        self.shape, self.fill, self.device = shape, fill, device
        self.rows = torch.zeros(capacity, dtype=torch.long, device=device)  # [S] slot -> row
        self._host_rows = [0] * capacity
        self.data = torch.full((1 + min(capacity, 4), *shape), fill, device=device)  # [R, *shape]
        self._free = list(range(self.data.shape[0] - 1, 0, -1))

    def put(self, slot: int, value: Tensor) -> int:
        """Store `value` (broadcast to the row shape) for `slot`; returns the row's bytes."""
        row = self._host_rows[slot]
        if row == 0:
            if not self._free:
                old = self.data.shape[0]
                grown = torch.full((old * 2 - 1, *self.shape), self.fill, device=self.device)
                grown[:old] = self.data
                self.data = grown
                self._free = list(range(grown.shape[0] - 1, old - 1, -1))
            row = self._free.pop()
            self._host_rows[slot] = row
            self.rows[slot] = row
        self.data[row] = value.to(self.device).expand(self.shape)
        return self.data[row].numel() * self.data.element_size()

    def drop(self, slot: int) -> None:
        row = self._host_rows[slot]
        if row:
            self.data[row].fill_(self.fill)
            self._free.append(row)
            self._host_rows[slot] = 0
            self.rows[slot] = 0

    def gather(self, idx: Tensor) -> Tensor:
        """Rows for slots idx [B] -> [B, *shape] (the default row for slots without one)."""
        return self.data.index_select(0, self.rows.index_select(0, idx))

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.rows.numel() * 8

    def widen(self, dim: int, size: int) -> None:
        """Grow row dimension `dim` (of the row shape) to `size`, keeping every row's values in front.

        The new entries hold the fill value: a LoRA table padded to a larger rank gains zero factors,
        which add nothing.
        """
        if size <= self.shape[dim]:
            return
        shape = list(self.shape)
        shape[dim] = size
        grown = torch.full((self.data.shape[0], *shape), self.fill, device=self.device)
        grown.narrow(dim + 1, 0, self.shape[dim]).copy_(self.data)
        self.data, self.shape = grown, tuple(shape)

    def row_of(self, slot: int) -> int:
        """The row `slot` reads (0: the default), known on the host without a device sync."""
        return self._host_rows[slot]
