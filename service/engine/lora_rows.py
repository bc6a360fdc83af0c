"""Per-row LoRA on the shared backbone: each row of a batch gets its own adapter's low-rank updates.

Semantics (row i of a batch, s = slot[i], every adapted module m with input x_m[i], output y_m[i]):

    y_m[i] += B_m[s] (A_m[s] x_m[i])        # B_m[s] holds alpha / r already
      conv   m: A_m[s] [r, C_in, kh, kw] a convolution with m's stride and padding (as peft builds it),
                B_m[s] [C_out, r] a 1x1 convolution:  [C_in, H, W] -> [r, H', W'] -> [C_out, H', W']
      linear m: A_m[s] [r, D_in], B_m[s] [D_out, r] on every token:  [N, D_in] -> [N, r] -> [N, D_out]

A slot without an adapter on m reads row 0 of m's tables (A = B = 0) and its rows are left out of m's
update, so AP, norm and VP rows in the same batch pass m unchanged. Every table is padded to the largest
rank resident: the extra rows of A and columns of B are zero and add nothing.

Mechanism per module, over the B' rows that carry an adapter there (all B, or a gathered subset):

    1x1 conv / linear: gather A [B', r, C_in] and B [B', C_out, r]; two batched matmuls
    k x k conv: A as ONE grouped convolution over the batch (x viewed [1, B' * C_in, H, W], weights
        [B' * r, C_in, kh, kw], groups = B': row i convolves with its own A only), then B as a batched
        matmul. Its cost is that of one adapter's A on B' rows, whatever the number of distinct adapters.
        The alternative, one dense convolution with the U distinct adapters' A stacked ([U * r] output
        channels) and a per-row selection, costs U times that; `bench/serving.py` measures both
        (`CONV_MODES`) and the grouped one is the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn

from service.engine.row_table import RowTable

if TYPE_CHECKING:
    from service.engine.backbones import Backbone, ModuleFn

ConvMode = Literal["grouped", "stacked"]
CONV_MODES: tuple[ConvMode, ...] = ("grouped", "stacked")


@dataclass(frozen=True)
class _Geometry:
    """What the per-row update needs to know of an adapted module."""

    conv: bool
    d_in: int
    d_out: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    same: bool = False  # timm's Conv2dSame: pad "same" for the input at hand, then convolve unpadded

    @property
    def pointwise(self) -> bool:
        """A 1x1 convolution without padding: a strided slice and a matmul, no convolution needed."""
        return self.conv and self.kernel == (1, 1) and self.padding in ((0, 0), "valid")

    def pad(self, x: Tensor) -> Tensor:
        return pad_same(x, list(self.kernel), list(self.stride)) if self.same else x


def _geometry(module: nn.Module) -> _Geometry:
    if isinstance(module, nn.Conv2d):
        k, s, p = module.kernel_size, module.stride, module.padding
        same = isinstance(module, Conv2dSame)
        return _Geometry(True, module.in_channels, module.out_channels, (k[0], k[1]), (s[0], s[1]), p, same)  # type: ignore[arg-type]
    if not isinstance(module, nn.Linear):
        raise TypeError(f"LoRA rows adapt Conv2d and Linear modules, not {type(module).__name__}")
    return _Geometry(False, module.in_features, module.out_features)


class LoRABank:
    """Per-slot LoRA factors of one backbone, per adapted module, and the per-row update of a batch."""

    def __init__(self, backbone: Backbone, capacity: int, conv_mode: ConvMode = "grouped") -> None:
        self.backbone = backbone
        self.capacity = capacity
        self.conv_mode: ConvMode = conv_mode
        self.rank = 0  # every table's padded rank
        self.a: dict[str, RowTable] = {}  # module -> rows of [r, C_in, kh, kw] / [r, D_in]
        self.b: dict[str, RowTable] = {}  # module -> rows of [C_out, r] (scaled by alpha / r)
        self._geometry: dict[str, _Geometry] = {}
        self._modules: list[frozenset[str]] = [frozenset()] * capacity  # slot -> its adapted modules

    def modules(self, slot: int) -> frozenset[str]:
        return self._modules[slot]

    def _tables(self, name: str) -> tuple[RowTable, RowTable, _Geometry]:
        if name not in self._geometry:
            g = _geometry(dict(self.backbone.model.named_modules())[name])
            a_shape = (self.rank, g.d_in, *g.kernel) if g.conv else (self.rank, g.d_in)
            dev = self.backbone.device
            self.a[name] = RowTable(self.capacity, a_shape, 0.0, dev)
            self.b[name] = RowTable(self.capacity, (g.d_out, self.rank), 0.0, dev)
            self._geometry[name] = g
            self.backbone.hook_modules([name])
        return self.a[name], self.b[name], self._geometry[name]

    def write(self, slot: int, factors: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> int:
        """Hold `factors` (module -> (A, B) in peft's shapes) for `slot`; returns the bytes they take."""
        self.drop(slot)
        rank = max((int(a.shape[0]) for a, _ in factors.values()), default=0)
        if rank > self.rank:
            self.rank = rank
            for name in self._geometry:
                self.a[name].widen(0, rank)
                self.b[name].widen(1, rank)
        nbytes = 0
        with torch.no_grad():
            for name, (a, b) in factors.items():
                ta, tb, _ = self._tables(name)
                r = int(a.shape[0])
                pa = torch.zeros(ta.shape, dtype=torch.float32)
                pa[:r] = a
                pb = torch.zeros(tb.shape, dtype=torch.float32)
                pb[:, :r] = b.reshape(b.shape[0], r) * scale
                nbytes += ta.put(slot, pa) + tb.put(slot, pb)
        self._modules[slot] = frozenset(factors)
        return nbytes

    def drop(self, slot: int) -> None:
        for name in self._modules[slot]:
            self.a[name].drop(slot)
            self.b[name].drop(slot)
        self._modules[slot] = frozenset()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.a.values(), *self.b.values()))

    # --- the forward path ----------------------------------------------------------------------------
    def module_fn(self, idx: Tensor, host: Sequence[int]) -> ModuleFn | None:
        """The per-row update for a batch of slots `idx` [B] (`host`: the same on the host), or None.

        Which rows act at which module is planned here, on the host, once per batch.
        """
        acting: dict[str, list[int]] = {}
        for pos, s in enumerate(host):
            for name in self._modules[s]:
                acting.setdefault(name, []).append(pos)
        if not acting:
            return None
        n = len(host)
        plans: dict[str, tuple[Tensor | None, Tensor, list[int]]] = {}
        for name, positions in acting.items():
            if len(positions) == n:
                plans[name] = (None, idx, list(host))  # every row: no gather of x, no scatter of y
            else:
                sub = torch.as_tensor(positions, dtype=torch.long, device=idx.device)  # [B']
                plans[name] = (sub, idx.index_select(0, sub), [host[p] for p in positions])

        def update(name: str, x: Tensor, y: Tensor) -> Tensor:
            plan = plans.get(name)
            if plan is None:
                return y
            pos, rows, host_rows = plan
            xs = x if pos is None else x.index_select(0, pos)  # [B', ...]
            left, right = self._factors(name, xs, rows, host_rows)
            if pos is None:  # y + left @ right in one fused call, no [B, *y.shape[1:]] temporary
                n = y.shape[0]
                return torch.baddbmm(y.reshape(n, left.shape[1], right.shape[2]), left, right).view_as(y)
            u = torch.bmm(left, right).to(y.dtype)  # [B', C_out, H'W'] / [B', N, D_out]
            return y.index_add(0, pos, u.view(-1, *y.shape[1:]))

        return update

    def _factors(self, name: str, x: Tensor, rows: Tensor, host_rows: list[int]) -> tuple[Tensor, Tensor]:
        """(left, right) whose batched product is B_m[s] (A_m[s] x) for every row of x, s = rows[i].

        conv: (B [B', C_out, r], A x [B', r, H'W']); linear: (x A^T [B', N, r], B^T [B', r, D_out]).
        """
        g = self._geometry[name]
        bm = self.b[name].gather(rows).to(x.dtype)  # [B', C_out, r]
        n = x.shape[0]
        x = g.pad(x)
        if not g.conv:
            a = self.a[name].gather(rows).to(x.dtype)  # [B', r, D_in]
            flat = x.reshape(n, -1, g.d_in)  # [B', N, D_in]
            z = torch.bmm(flat, a.transpose(1, 2))  # [B', N, r]
            return z, bm.transpose(1, 2)  # [B', N, r], [B', r, D_out]
        if g.pointwise:
            a = self.a[name].gather(rows).to(x.dtype)  # [B', r, C_in, 1, 1]
            sh, sw = g.stride
            xs = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x  # [B', C_in, H', W']
            z = torch.bmm(a.flatten(1).view(n, -1, g.d_in), xs.reshape(n, g.d_in, -1))  # [B', r, H'W']
        elif self.conv_mode == "grouped":
            a = self.a[name].gather(rows).to(x.dtype)  # [B', r, C_in, kh, kw]
            z4 = F.conv2d(
                x.reshape(1, n * g.d_in, *x.shape[2:]),  # [1, B' * C_in, H, W]
                a.reshape(n * self.rank, g.d_in, *g.kernel),  # [B' * r, C_in, kh, kw]
                stride=g.stride,
                padding=g.padding,
                groups=n,
            )  # [1, B' * r, H', W']
            z = z4.view(n, self.rank, -1)  # [B', r, H'W']
        else:  # stacked: the distinct adapters' A as one dense convolution, then each row's r channels
            table = self.a[name]
            distinct = list(dict.fromkeys(table.row_of(s) for s in host_rows))
            where = {row: u for u, row in enumerate(distinct)}
            inv = torch.as_tensor([where[table.row_of(s)] for s in host_rows], device=x.device)  # [B']
            stack = table.data.index_select(0, torch.as_tensor(distinct, device=x.device)).to(
                x.dtype
            )  # [U, r, C_in, kh, kw]
            z4 = F.conv2d(x, stack.flatten(0, 1), stride=g.stride, padding=g.padding)  # [B', U * r, H', W']
            z = z4.view(n, len(distinct), self.rank, -1)[
                torch.arange(n, device=x.device), inv
            ]  # [B', r, H'W']
        return bm, z  # [B', C_out, r], [B', r, H'W']
