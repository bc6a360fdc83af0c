"""Heterogeneous batched inference: one forward pass for a batch whose rows use different prompts.

Semantics (row i of a batch, s = slot[i], every tensor below lives in the PromptBank):

    x[i]      <- where(pad[s], shrink(x[i], scale[s]) * keep[s], x[i]) + frame[s]    # VP (layer 0)
    h_l[i]    += P_l[s]                  for every layer l any row of the batch prompts at
    y_m[i]    += B_m[s] (A_m[s] x_m[i])  for every module m a LoRA row adapts (see `lora_rows`)
    y_n[i]    <- y_n[i] * (1 + S_n[s]) + T_n[s]   for every norm module n (norm-tune, deep AP + norm rows)
    logits[i] = W[s] @ f[i] + b[s]       # W [Kmax, D], b [Kmax], b = -inf on padded classes

A slot's entries are neutral wherever its prompt does not act (P_l[s] = 0 at layers it does not use,
no LoRA update on modules it does not adapt, S = T = 0 without norm-tune, frame = 0 and keep = 1
without VP), so "rows whose prompt sits elsewhere add nothing there" holds exactly, and each row equals
`predict_single` for its own artifact (for LoRA: its own peft forward).
P_l[s] is stored as `table_l.data[table_l.rows[s]]` (row 0 = zeros), so a layer's table holds rows
only for the slots prompting there. The bank is the mechanism (slots written by index); which prompts
are resident is the serving layer's policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.engine.artifacts import PromptArtifact, load_module
from service.engine.errors import ArtifactError
from service.engine.lora_rows import LoRABank
from service.engine.methods.activation import delta_key
from service.engine.methods.input_prompt import INPUT_KEY, frame_mask, shrink_images, shrink_scale
from service.engine.methods.lora import LoRAConfig, lora_factors, lora_first_layer
from service.engine.methods.norm import affine_view, scale_key, shift_key
from service.engine.row_table import RowTable

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


class PromptBank:
    """Per-slot tensors for one backbone: heads (preallocated), deltas, norm affine, VP frames, LoRA.

    Heads and per-slot scalars are preallocated for `capacity` slots. Per-layer delta tables and the
    VP frame tables are RowTables created on the first write that needs them and grown on demand, so
    a bank does not cost memory on layers nobody prompts.
    """

    def __init__(self, backbone: Backbone, capacity: int, max_classes: int) -> None:
        if capacity < 1 or max_classes < 1:
            raise ValueError("capacity and max_classes must be >= 1")
        self.backbone = backbone
        self.capacity = capacity
        self.max_classes = max_classes
        dev = backbone.device
        d = backbone.num_features
        self.head_w = torch.zeros(capacity, max_classes, d, device=dev)  # [S, Kmax, D]
        self.head_b = torch.full((capacity, max_classes), float("-inf"), device=dev)  # [S, Kmax]
        self.deltas: dict[int, RowTable] = {}  # layer -> rows of [*layer shape]
        self.norm_scale: dict[str, Tensor] = {}  # norm name -> [S, C]
        self.norm_shift: dict[str, Tensor] = {}  # norm name -> [S, C]
        self.vp_frame: RowTable | None = None  # rows of [3, H, W]: VP frame (zero inside) or additive delta
        self.vp_keep: RowTable | None = None  # rows of [1, H, W]: 1 where the (shrunk) image shows
        self.vp_scale: Tensor | None = None  # [S, 2]: (sx, sy) of the shrink, 1 for non-pad slots
        self.vp_pad: Tensor | None = None  # [S] bool: the slot shrinks its image
        self.lora = LoRABank(backbone, capacity)  # per adapted module: rows of A and (scaled) B
        # Routing metadata, on the host so that a batch needs no device sync to plan its pass.
        self._layers: list[frozenset[int]] = [frozenset()] * capacity
        self._first: list[int] = [backbone.pooled_index] * capacity
        self._norm: list[bool] = [False] * capacity
        self._vp: list[bool] = [False] * capacity
        self._pad: list[bool] = [False] * capacity
        self._occupied: list[bool] = [False] * capacity
        self._num_classes: list[int] = [0] * capacity

    # --- writing -------------------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} outside 0..{self.capacity - 1}")

    def _delta_table(self, layer: int) -> RowTable:
        if layer not in self.deltas:
            shape = tuple(self.backbone.layers[layer].shape)
            self.deltas[layer] = RowTable(self.capacity, shape, 0.0, self.backbone.device)
        return self.deltas[layer]

    def _ensure_norm(self) -> None:
        if not self.norm_scale:
            for n in self.backbone.norm_layers:
                self.norm_scale[n.name] = torch.zeros(
                    self.capacity, n.num_features, device=self.backbone.device
                )
                self.norm_shift[n.name] = torch.zeros(
                    self.capacity, n.num_features, device=self.backbone.device
                )

    def _ensure_vp(self) -> tuple[RowTable, RowTable, Tensor, Tensor]:
        if self.vp_frame is None or self.vp_keep is None or self.vp_scale is None or self.vp_pad is None:
            h, w = self.backbone.input_size
            dev, s = self.backbone.device, self.capacity
            self.vp_frame = RowTable(s, (3, h, w), 0.0, dev)
            self.vp_keep = RowTable(s, (1, h, w), 1.0, dev)
            self.vp_scale = torch.ones(s, 2, device=dev)
            self.vp_pad = torch.zeros(s, dtype=torch.bool, device=dev)
        return self.vp_frame, self.vp_keep, self.vp_scale, self.vp_pad

    def write(self, slot: int, artifact: PromptArtifact) -> int:
        """Load `artifact` into `slot` (replacing what was there); returns the bytes the slot holds.

        Raises:
            ArtifactError: another backbone, a non-servable method, or more classes than max_classes.
        """
        self._check_slot(slot)
        k = artifact.num_classes
        if k > self.max_classes:
            raise ArtifactError(f"artifact has {k} classes; this bank holds at most {self.max_classes}")
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        lora_scale = 1.0
        t: dict[str, Tensor]
        if artifact.method == LoRAConfig.method:
            t, factors, lora_scale = self._lora_parts(artifact)
            delta_layers: tuple[int, ...] = ()
            uses_norm, first_layer = False, lora_first_layer(self.backbone, list(factors))
        else:
            module = load_module(artifact, self.backbone)  # validates backbone, method and tensor shapes
            if not module.servable:
                raise ArtifactError(f"method {artifact.method!r} copies the backbone and cannot be served")
            t = module.export_tensors()
            # What the slot holds follows from the tensors the method exports (AP deltas, norm affine, VP
            # frame), so a method that combines them (deep AP + norm) is gathered for both per row.
            delta_layers = tuple(i for i in module.prompt_layers if delta_key(i) in t)
            uses_norm = any(scale_key(n.name) in t for n in self.backbone.norm_layers)
            first_layer = module.first_layer
        self.clear(slot)
        dev = self.backbone.device
        nbytes = 0
        with torch.no_grad():
            self.head_w[slot, :k] = t["head.weight"].to(dev)
            self.head_b[slot, :k] = t["head.bias"].to(dev)
            nbytes += (self.head_w[slot].numel() + self.head_b[slot].numel()) * 4
            for layer in delta_layers:
                nbytes += self._delta_table(layer).put(slot, t[delta_key(layer)])  # channel -> full
            if uses_norm:
                self._ensure_norm()
                for name in self.norm_scale:
                    self.norm_scale[name][slot] = t[scale_key(name)].to(dev)
                    self.norm_shift[name][slot] = t[shift_key(name)].to(dev)
                    nbytes += 2 * self.norm_scale[name][slot].numel() * 4
            if INPUT_KEY in t:
                frame, keep, scale, pad = self._ensure_vp()
                nbytes += frame.put(slot, t[INPUT_KEY])
                if artifact.metadata.get("input_variant") == "pad":
                    p = int(artifact.metadata["pad_size"])
                    size = self.backbone.input_size
                    nbytes += keep.put(slot, 1.0 - frame_mask(size, p, dev))
                    scale[slot] = torch.tensor(shrink_scale(size, p), device=dev)
                    pad[slot] = True
                    self._pad[slot] = True
                self._vp[slot] = True
            if factors:
                nbytes += self.lora.write(slot, factors, lora_scale)
        self._layers[slot] = frozenset(delta_layers)
        self._first[slot] = first_layer
        self._norm[slot] = uses_norm
        self._occupied[slot] = True
        self._num_classes[slot] = k
        return nbytes

    def _lora_parts(
        self, artifact: PromptArtifact
    ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]], float]:
        """Head tensors, factors (module -> (A, B)) and scale of a LoRA artifact, all checked.

        Read straight from the artifact: rebuilding its module would copy the whole backbone (the peft
        training copy) for every slot write.
        """
        artifact.check_backbone(self.backbone)
        cfg = artifact.method_config
        if not isinstance(cfg, LoRAConfig):
            raise ArtifactError(f"artifact of method {cfg.method!r} read as a LoRA artifact")
        factors = lora_factors(self.backbone, cfg, artifact.tensors)
        head: dict[str, Tensor] = {
            k: artifact.tensors[k] for k in ("head.weight", "head.bias") if k in artifact.tensors
        }
        if tuple(head.get("head.bias", torch.empty(0)).shape) != (artifact.num_classes,):
            raise ArtifactError(
                f"artifact tensor 'head.bias' does not fit a {artifact.num_classes}-class head"
            )
        return head, factors, cfg.scale

    def clear(self, slot: int) -> None:
        """Reset `slot` to "no prompt": zero deltas / affine / frame, padded head."""
        self._check_slot(slot)
        with torch.no_grad():
            self.head_w[slot].zero_()
            self.head_b[slot].fill_(float("-inf"))
            for layer in self._layers[slot]:
                self.deltas[layer].drop(slot)
            if self._norm[slot]:
                for name in self.norm_scale:
                    self.norm_scale[name][slot].zero_()
                    self.norm_shift[name][slot].zero_()
            if self._vp[slot] and self.vp_frame is not None and self.vp_keep is not None:
                assert self.vp_scale is not None and self.vp_pad is not None
                self.vp_frame.drop(slot)
                self.vp_keep.drop(slot)
                self.vp_scale[slot].fill_(1.0)
                self.vp_pad[slot] = False
            self.lora.drop(slot)
        self._layers[slot] = frozenset()
        self._first[slot] = self.backbone.pooled_index
        self._norm[slot] = self._vp[slot] = self._pad[slot] = self._occupied[slot] = False
        self._num_classes[slot] = 0

    # --- views ---------------------------------------------------------------------------------------
    def occupied(self, slot: int) -> bool:
        return self._occupied[slot]

    def num_classes(self, slot: int) -> int:
        return self._num_classes[slot]

    def first_layer(self, slots: Sequence[int]) -> int:
        """Earliest layer any of `slots` acts at: the shared prefix before it can run once."""
        return min((self._first[s] for s in slots), default=self.backbone.pooled_index)

    @property
    def nbytes(self) -> int:
        """Device bytes the bank holds now (grows as row tables grow)."""
        tensors = [self.head_w, self.head_b, *self.norm_scale.values(), *self.norm_shift.values()]
        tensors += [t for t in (self.vp_scale, self.vp_pad) if t is not None]
        tables = [*self.deltas.values(), *(t for t in (self.vp_frame, self.vp_keep) if t is not None)]
        held = sum(t.numel() * t.element_size() for t in tensors) + sum(t.nbytes for t in tables)
        return held + self.lora.nbytes


def _slot_list(slots: Tensor | Sequence[int]) -> list[int]:
    return [int(s) for s in (slots.tolist() if isinstance(slots, Tensor) else slots)]


def forward_mixed_from(
    backbone: Backbone, bank: PromptBank, h: Tensor, start: int, slots: Tensor | Sequence[int]
) -> Tensor:
    """Logits [B, Kmax] from the unprompted activation `h` at layer `start` (see the module docstring).

    `start` must not lie after any row's first prompt layer (use `bank.first_layer(slots)`).
    """
    host = _slot_list(slots)
    if host and bank.first_layer(host) < start:
        raise ValueError(f"a row's prompt acts before layer {start}; start the pass earlier")
    for s in host:
        if not bank.occupied(s):
            raise ArtifactError(f"slot {s} holds no prompt")
    idx = torch.as_tensor(host, dtype=torch.long, device=backbone.device)  # [B]
    # Per layer, the batch positions whose prompt acts there (planned on the host, no device sync).
    acting: dict[int, list[int]] = {}
    for pos, s in enumerate(host):
        for layer in bank._layers[s]:
            acting.setdefault(layer, []).append(pos)

    def add_delta(i: int, a: Tensor, *, inplace: bool) -> Tensor:
        positions = acting[i]
        if len(positions) == len(host):  # every row prompts here: one dense gather + add
            return a + bank.deltas[i].gather(idx)  # [B, *shape_i]
        # Only the rows that act at layer i: gather and add B_i rows, not B (memory-bound on CPU).
        pos = torch.as_tensor(positions, dtype=torch.long, device=a.device)  # [B_i]
        rows = bank.deltas[i].gather(idx.index_select(0, pos)).to(a.dtype)  # [B_i, *shape_i]
        return a.index_add_(0, pos, rows) if inplace else a.index_add(0, pos, rows)

    if start == 0 and any(bank._vp[s] for s in host):
        h = _apply_input(bank, h, idx, any(bank._pad[s] for s in host))
    if start in acting:
        h = add_delta(start, h, inplace=False)  # h may be a prefix shared with other prompts
    layer_fn = None
    if acting:

        def layer_fn(i: int, a: Tensor) -> Tensor:
            # A segment's output is a fresh tensor; in place is safe when no autograd graph needs it.
            return add_delta(i, a, inplace=not torch.is_grad_enabled()) if i in acting else a

    norm_fn = None
    if any(bank._norm[s] for s in host):
        cdim = {n.name: n.channel_dim for n in backbone.norm_layers}

        def norm_fn(name: str, y: Tensor) -> Tensor:
            if name not in bank.norm_scale:
                return y
            s = affine_view(
                bank.norm_scale[name].index_select(0, idx), y, cdim[name]
            )  # [B, C, 1, 1] / [B, 1, C]
            t = affine_view(bank.norm_shift[name].index_select(0, idx), y, cdim[name])
            return y * (1.0 + s) + t

    module_fn = bank.lora.module_fn(idx, host)  # None when no row of the batch carries LoRA
    f = backbone.run(
        h, start, backbone.pooled_index, layer_fn=layer_fn, norm_fn=norm_fn, module_fn=module_fn
    )  # [B, D]
    w = bank.head_w.index_select(0, idx)  # [B, Kmax, D]
    b = bank.head_b.index_select(0, idx)  # [B, Kmax]
    return torch.baddbmm(b.unsqueeze(2), w, f.unsqueeze(2).to(w.dtype)).squeeze(2)  # [B, Kmax]


def _apply_input(bank: PromptBank, x: Tensor, idx: Tensor, any_pad: bool) -> Tensor:
    """VP rows: shrink into the frame (pad slots) and add the frame / additive delta."""
    frame, keep, scale, pad = bank._ensure_vp()
    if any_pad:
        shrunk = shrink_images(x, scale.index_select(0, idx)) * keep.gather(idx)  # [B, 3, H, W]
        x = torch.where(pad.index_select(0, idx)[:, None, None, None], shrunk, x)
    return x + frame.gather(idx)


def forward_mixed(backbone: Backbone, bank: PromptBank, x: Tensor, slots: Tensor | Sequence[int]) -> Tensor:
    """Logits [B, Kmax] (padded classes = -inf) for images x [B, 3, H, W], row i under slot[i].

    One pass: the prefix before the earliest prompt of the batch runs once for all rows.
    """
    host = _slot_list(slots)
    start = bank.first_layer(host)
    with torch.no_grad():
        h = backbone.run(x, 0, start) if start > 0 else x
        return forward_mixed_from(backbone, bank, h, start, host)


def forward_multi(backbone: Backbone, bank: PromptBank, x: Tensor, slots: Tensor | Sequence[int]) -> Tensor:
    """Every image under every slot: logits [P, N, Kmax] for x [N, 3, H, W] and P slots.

    The part before the earliest prompt layer runs once on the N images; the rest runs on P * N rows.
    """
    host = _slot_list(slots)
    n, p = x.shape[0], len(host)
    start = bank.first_layer(host)
    with torch.no_grad():
        h = backbone.run(x, 0, start) if start > 0 else x  # [N, *shape_start]
        h = h.repeat(p, *([1] * (h.dim() - 1)))  # [P * N, ...], prompt-major
        rows = [s for s in host for _ in range(n)]  # [P * N]
        return forward_mixed_from(backbone, bank, h, start, rows).view(p, n, -1)


def predict_single(backbone: Backbone, artifact: PromptArtifact, x: Tensor) -> Tensor:
    """The per-row reference path: logits [B, K] of one artifact's own module (no bank)."""
    module = load_module(artifact, backbone)
    with torch.no_grad():
        return module(x.to(backbone.device))
