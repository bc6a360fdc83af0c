"""The engine core: one shared backbone per (spec, device), with its slot table, batcher and admission.

It runs in the engine process (:mod:`service.serving.engine_server` feeds it from every front) or, in the
single-process mode, inside the one API process. Callers resolve and authorise tenant-facing ids
(``prm_x@3``) into internal keys and decode images into preprocessed tensors first; this layer sees
neither tenants' ids nor the database, only keys, a :class:`PromptSource` to load them, and tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.engine import Backbone, BackboneSpec, create_backbone
from service.engine.mixed_batch import predict_single
from service.engine.preprocessing import Preprocessing
from service.serving import metrics
from service.serving.admission import Admission
from service.serving.batcher import MicroBatcher
from service.serving.cache import LoadedPrompt, PromptCache, PromptSource
from service.serving.errors import (
    DeadlineExceededError,
    OverloadedError,
    PromptNotFoundError,
    ServingClosedError,
)
from service.serving.slots import SlotPolicy, SlotTable, slot_bytes

log = logging.getLogger(__name__)

__all__ = ["EngineCore", "PromptPrediction", "ServingConfig"]


@dataclass(frozen=True)
class ServingConfig:
    """Serving knobs (the gateway fills them from Settings; each says why it has its default)."""

    device: str = "cpu"
    #: a few ms: long enough for concurrent requests to meet, short against a forward pass (tens of ms)
    max_wait_ms: float = 5.0
    #: 64 rows: past this a CPU forward pass gains little throughput and each request waits longer
    max_batch_rows: int = 64
    #: host tier: decoded artifacts (tens of KB each) ahead of the database; 256 MiB holds thousands
    host_cache_bytes: int = 256 << 20
    #: device tier: the slot table is preallocated, so its capacity = these bytes / bytes per slot
    device_cache_bytes: int = 256 << 20
    #: upper bound on slots whatever the bytes say (the gather index stays small)
    max_slots: int = 1024
    #: lower bound: a batch of max_batch_rows different prompts needs as many slots; the byte budget is a
    #: worst case (a delta at every layer), so this floor rarely costs what the bound says
    min_slots: int = 64
    #: head padding width of the slot table (slots x classes x features floats); a prompt with more classes
    #: is served on its own pass instead (correct, not batched)
    max_classes: int = 100
    #: share of slots that pins may hold, so unpinned traffic always finds room
    pin_fraction: float = 0.5
    #: a request expected to wait longer than this before its first row runs is refused (503 overloaded);
    #: half a second keeps the admitted requests' latency a few passes long while the excess is told to retry
    queue_budget_ms: float = 500.0
    #: rows each tenant's queue may send per deficit-round-robin turn (small: fine-grained interleaving)
    fair_quantum_rows: int = 8
    #: passes that run at once, each on its own model thread (see service.serving.batcher); one on a GPU
    model_lanes: int = 1
    #: run the backbone's segments as TorchScript traces where they reproduce the eager ones (exactly, or
    #: within tolerance when optimised; `Backbone.trace_segments`: one GIL hold per segment, not per op)
    traced_segments: bool = True
    #: optimise the traces (`Backbone.trace_segments`: norms folded, channels-last on a CPU): fewer cycles
    #: per row, outputs within 1e-4 of the eager ones instead of bit for bit
    optimised_segments: bool = True
    #: added to the model threads' nice value (Linux, per thread): > 0 lets the latency-bound work on the
    #: same cores (the fronts' HTTP and refusals, the engine's event loop) take the CPU before the passes
    model_nice: int = 0


@dataclass(frozen=True)
class PromptPrediction:
    """One prompt's answer for every image of a request."""

    key: str
    classes: list[str]
    probabilities: Tensor  # [N, K]

    def top_k(self, k: int) -> list[list[dict[str, Any]]]:
        """Per image, the k most probable classes as {label, index, probability}."""
        k = max(1, min(k, len(self.classes)))
        # numpy, not torch.topk: a request's few rows make this all call overhead, which numpy has less of
        probs = self.probabilities.numpy()  # [N, K] float32 (CPU: the engine's answers always are)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [N, k]; ties: the lower index first
        classes = self.classes
        return [
            [{"label": classes[i], "index": i, "probability": p} for i, p in zip(ix, pr, strict=True)]
            for ix, pr in zip(order.tolist(), np.take_along_axis(probs, order, axis=1).tolist(), strict=True)
        ]


@dataclass(eq=False)
class _Server:
    """One backbone on one device: its slot table (mechanism), slot policy, batcher and admission."""

    backbone: Backbone
    table: SlotTable
    policy: SlotPolicy
    batcher: MicroBatcher
    admission: Admission
    checked: set[tuple[str, int]] = field(default_factory=set)  # (key, generation) matched to this backbone
    model_threads: int = 0  # threads the passes use: lanes x torch's intra-op threads on each


class EngineCore:
    """Predicts with many tenants' prompts on shared backbones, through the cache and the micro-batcher."""

    def __init__(self, source: PromptSource, config: ServingConfig | None = None) -> None:
        self.config = config or ServingConfig()
        self.cache = PromptCache(source, max_bytes=self.config.host_cache_bytes)
        self.cache.add_invalidation_listener(self._on_invalidate)
        self._servers: dict[str, _Server] = {}
        self._starting: dict[str, asyncio.Task[tuple[Backbone, SlotTable]]] = {}
        self._closed = False
        self._spec_keys: dict[str, str] = {}  # canonical spec JSON -> spec_hash

    # -- backbones --------------------------------------------------------------------------------------
    async def server(self, spec: BackboneSpec) -> _Server:
        """The shared backbone for ``spec`` on this device, created once on first use.

        The weights load and the slot table is allocated in a thread; the policy and the batcher (asyncio
        state) are created here, on the loop that will use them.
        """
        if self._closed:
            raise ServingClosedError("the server is shutting down")
        key = self._key_of(spec)
        srv = self._servers.get(key)
        if srv is not None:
            return srv
        task = self._starting.get(key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._load_backbone, spec))
            self._starting[key] = task
        try:
            backbone, table = await asyncio.shield(task)
        finally:
            if task.done():
                self._starting.pop(key, None)
        if self._closed:
            raise ServingClosedError("the server is shutting down")
        srv = self._servers.get(key)
        if srv is None:
            srv = self._servers[key] = self._make_server(spec, backbone, table)
            # what the passes really run with (a thread count inherited by mistake halves a CPU's speed)
            per_lane = await srv.batcher.run_on_model_thread(torch.get_num_threads)
            srv.model_threads = per_lane * srv.batcher.lanes
            metrics.MODEL_THREADS.labels(backbone=srv.batcher.name).set(srv.model_threads)
        srv.batcher.start()
        return srv

    def _key_of(self, spec: BackboneSpec) -> str:
        """spec_hash() resolves through timm (deep-copying its config): once per spec, not per call."""
        raw = json.dumps(spec.to_dict(), sort_keys=True, default=str)
        key = self._spec_keys.get(raw)
        if key is None:
            key = self._spec_keys[raw] = spec.spec_hash()
        return key

    def _load_backbone(self, spec: BackboneSpec) -> tuple[Backbone, SlotTable]:
        """Off the loop: weights and the preallocated slot table (no asyncio objects here)."""
        cfg = self.config
        backbone = create_backbone(spec, cfg.device)
        # optimised traces if they stay within tolerance, else the exact ones (else eager)
        optimised = cfg.traced_segments and cfg.optimised_segments and backbone.trace_segments(optimise=True)
        if cfg.traced_segments and not optimised:
            backbone.trace_segments()
        per_slot = slot_bytes(backbone, cfg.max_classes)
        capacity = max(2, cfg.min_slots, min(cfg.max_slots, cfg.device_cache_bytes // per_slot))
        if capacity * per_slot > cfg.device_cache_bytes:
            log.warning(
                "%s: %d slots may reach %d bytes (budget %d) if prompts use every layer",
                spec.model,
                capacity,
                capacity * per_slot,
                cfg.device_cache_bytes,
            )
        log.info("serving %s: %d slots of %d bytes", spec.model, capacity, per_slot)
        return backbone, SlotTable(backbone, capacity, cfg.max_classes)

    def _make_server(self, spec: BackboneSpec, backbone: Backbone, table: SlotTable) -> _Server:
        """On the loop: the slot policy and the batcher that belong to it."""
        cfg = self.config
        name = f"{spec.model}@{backbone.device!s}"
        capacity = table.capacity
        policy = SlotPolicy(capacity, max_pinned=int(capacity * cfg.pin_fraction), name=name)
        admission = Admission(
            budget_s=cfg.queue_budget_ms / 1000,
            name=name,
            batch_rows=cfg.max_batch_rows,
            lanes=cfg.model_lanes,
        )
        batcher = MicroBatcher(
            table,
            policy,
            self.cache,
            name=name,
            max_wait_ms=cfg.max_wait_ms,
            max_batch_rows=cfg.max_batch_rows,
            fair_quantum=cfg.fair_quantum_rows,
            on_pass=admission.observe,
            lanes=cfg.model_lanes,
            thread_nice=cfg.model_nice,
        )
        metrics.BACKBONES.labels(backbone=spec.model, device=str(backbone.device)).set(1)
        return _Server(backbone=backbone, table=table, policy=policy, batcher=batcher, admission=admission)

    def _on_invalidate(self, key: str) -> None:
        for srv in self._servers.values():
            srv.policy.invalidate(key)

    # -- prompts ----------------------------------------------------------------------------------------
    async def _load(self, srv: _Server, keys: Sequence[str]) -> list[LoadedPrompt]:
        """Artifacts for ``keys`` (misses load concurrently), each checked once against the backbone."""
        prompts = await asyncio.gather(*(self.cache.get(k) for k in keys))
        for p in prompts:
            if (p.key, p.generation) not in srv.checked:
                p.artifact.check_backbone(srv.backbone)  # ArtifactError: trained on another backbone
                srv.checked.add((p.key, p.generation))
        return list(prompts)

    def _bankable(self, p: LoadedPrompt) -> bool:
        """Whether the slot table can hold ``p``; else it is served on its own (rare: a very wide head)."""
        return p.artifact.num_classes <= self.config.max_classes

    @property
    def alive(self) -> bool:
        """In this process: always (the front's :class:`Engine` interface asks an engine process)."""
        return True

    async def invalidate(self, key: str) -> None:
        """Never serve ``key`` again from any tier (call after its deletion or replacement committed)."""
        self.cache.invalidate(key)

    async def pin(self, spec: BackboneSpec, key: str) -> int:
        """Keep ``key`` in host memory and in a device slot until unpinned; returns the slot."""
        srv = await self.server(spec)
        (loaded,) = await self._load(srv, [key])
        max_pinned_bytes = int(self.config.host_cache_bytes * self.config.pin_fraction)
        loaded = await self.cache.pin(key, max_pinned_bytes=max_pinned_bytes)
        try:
            slot, must_write = srv.policy.pin(loaded)
        except Exception:
            self.cache.unpin(key)
            raise
        if must_write:  # no await between the policy's choice and this write: passes admitted later wait
            try:
                await srv.batcher.run_on_model_thread(srv.table.write, slot, loaded.artifact)
            except Exception:
                srv.policy.forget([key])
                self.cache.unpin(key)
                raise
        return slot

    async def unpin(self, key: str) -> bool:
        was = self.cache.unpin(key)
        for srv in self._servers.values():
            was = srv.policy.unpin(key) or was
        return was

    # -- prediction -------------------------------------------------------------------------------------
    async def predict(
        self,
        spec: BackboneSpec,
        keys: Sequence[str],
        x: Tensor,
        *,
        tenant_id: str = "",
        deadline: float | None = None,
    ) -> list[PromptPrediction]:
        """Probabilities of images ``x`` [N, 3, H, W] (preprocessed) under each prompt in ``keys``.

        Admission comes first, before any prompt loads: OverloadedError (past the queue-wait budget) or
        DeadlineExceededError (``deadline``, ``time.time()`` seconds, cannot be met or passed while queued).
        Raises PromptNotFoundError (gone), ArtifactError (not for this backbone), ServingClosedError.
        """
        outcome = "error"
        try:
            out = await self._predict(spec, keys, x, tenant_id, deadline)
            outcome = "ok"
            return out
        except PromptNotFoundError:
            outcome = "not_found"
            raise
        except (OverloadedError, DeadlineExceededError):
            outcome = "refused"
            raise
        finally:
            metrics.REQUESTS.labels(tenant=metrics.tenant_label(tenant_id), outcome=outcome).inc()

    async def _predict(
        self, spec: BackboneSpec, keys: Sequence[str], x: Tensor, tenant_id: str, deadline: float | None
    ) -> list[PromptPrediction]:
        if not keys:
            return []
        srv = await self.server(spec)
        unique = list(dict.fromkeys(keys))
        ticket = srv.admission.admit(tenant_id, int(x.shape[0]) * len(unique), deadline)
        try:
            return await self._run(srv, keys, unique, x, tenant_id, deadline)
        finally:
            srv.admission.release(ticket)

    async def _run(
        self,
        srv: _Server,
        keys: Sequence[str],
        unique: list[str],
        x: Tensor,
        tenant_id: str,
        deadline: float | None,
    ) -> list[PromptPrediction]:
        prompts = await self._load(srv, unique)
        logits: dict[str, list[Tensor]] = {p.key: [] for p in prompts}
        batched = [p for p in prompts if self._bankable(p)]
        # chunk so every submit fits one batch and the slot table: prompts first, then images
        per_group = max(1, min(srv.policy.max_prompts_per_request, self.config.max_batch_rows))
        groups = [batched[i : i + per_group] for i in range(0, len(batched), per_group)]
        n = int(x.shape[0])
        jobs: list[tuple[list[LoadedPrompt], Awaitable[list[Tensor]]]] = []
        for group in groups:
            step = max(1, self.config.max_batch_rows // len(group))
            for i in range(0, n, step):
                chunk = x[i : i + step]
                jobs.append((group, srv.batcher.submit(group, chunk, tenant=tenant_id, deadline=deadline)))
        for p in prompts:
            if not self._bankable(p):
                jobs.append(([p], self._single(srv, p, x)))
        results = await asyncio.gather(*(job for _, job in jobs))
        for (group, _), per_prompt in zip(jobs, results, strict=True):
            for p, lg in zip(group, per_prompt, strict=True):
                logits[p.key].append(lg)  # [n_i, K], in image order
        by_key = {p.key: p for p in prompts}
        return [
            PromptPrediction(
                key=k,
                classes=by_key[k].artifact.classes,
                probabilities=torch.softmax(torch.cat(logits[k]), dim=1),  # [N, K]
            )
            for k in keys
        ]

    async def _single(self, srv: _Server, p: LoadedPrompt, x: Tensor) -> list[Tensor]:
        """The per-request path for a prompt the slot table cannot hold, on the same model thread."""
        if not self.cache.is_current(p):
            raise PromptNotFoundError(f"prompt {p.key!r} was deleted or replaced")

        def run() -> list[Tensor]:
            with torch.inference_mode():
                return [predict_single(srv.backbone, p.artifact, x).float().cpu()]  # [N, K]

        return await srv.batcher.run_on_model_thread(run)

    async def pipelines(self, spec: BackboneSpec, keys: Sequence[str]) -> list[Preprocessing]:
        """The image pipeline each prompt was trained with (loading the prompts): the front preprocesses
        every image with exactly that before it asks for a prediction."""
        srv = await self.server(spec)
        return [p.artifact.preprocessing(srv.backbone) for p in await self._load(srv, list(keys))]

    # -- introspection and shutdown --------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        return {
            "host": {
                **self.cache.stats.to_dict(),
                "resident_bytes": self.cache.resident_bytes,
                "entries": len(self.cache),
            },
            "backbones": {
                name: {
                    "slots": srv.policy.capacity,
                    "model_threads": srv.model_threads,
                    "lanes": srv.batcher.lanes,
                    "resident": len(srv.policy),
                    "device": srv.policy.stats.to_dict(),
                    "batches": vars(srv.batcher.stats),
                    "queue": {
                        "rows": srv.admission.rows,
                        "row_ms": round(srv.admission.row_s * 1000, 4),
                        "pass_ms": round(srv.admission.pass_s * 1000, 4),
                        "refused": srv.admission.refused,
                    },
                }
                for name, srv in self._servers.items()
            },
        }

    async def aclose(self) -> None:
        """Refuse new work, wait for backbones still loading (their threads), then stop every batcher."""
        self._closed = True
        starting = list(self._starting.values())
        if starting:
            await asyncio.gather(*starting, return_exceptions=True)
        for srv in self._servers.values():
            await srv.batcher.aclose()
            metrics.BACKBONES.labels(backbone=srv.backbone.spec.model, device=str(srv.backbone.device)).set(0)
        self._servers.clear()
