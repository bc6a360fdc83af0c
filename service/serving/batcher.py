"""The cross-request micro-batcher: every tenant's predict requests for one backbone+device, one forward pass.

Requests queue on the event loop, one FIFO per tenant served by deficit round robin
(:class:`service.serving.admission.FairQueue`). A collector takes the next, then whatever else arrives within
``max_wait_ms`` or until ``max_batch_rows`` rows (image x prompt) are gathered, leases device slots for the
batch's prompts from the :class:`SlotPolicy`, and hands the slot writes plus the forward pass to a model
thread; the event loop never blocks on the model. ``lanes`` model threads run that many batches at once:
on a CPU, one single-threaded pass per core runs a small backbone about half again faster than one pass
spread over the cores (its convolutions are too small to split well), as a LitServe or mosec deployment
with one model process per core does, but over one copy of the weights and one slot table. Passes only
read the slot table; a slot write (and anything else run with :meth:`run_on_model_thread`) waits until
no pass runs, and passes wait for it. A request whose prompts do not
fit beside the others waits for the next batch (never fails for room), and a request whose prompt was
invalidated after it was loaded is refused rather than served stale; one whose deadline passed is dropped
before it is computed.

Rows are laid out request by request, prompt by prompt: request r with images x_r [N_r, 3, H, W] and prompts
(p_1..p_P) contributes rows (p_1, x_r[0..N_r)), (p_2, x_r[0..N_r)), ... Its images enter the batch once;
``image_index`` [B] maps rows to them, so the backbone before the earliest prompt layer runs once per image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from service.engine.artifacts import PromptArtifact
from service.serving import metrics
from service.serving.admission import FairQueue
from service.serving.cache import LoadedPrompt, PromptCache
from service.serving.errors import (
    DeadlineExceededError,
    PromptNotFoundError,
    ServingClosedError,
    ServingError,
)
from service.serving.slots import SlotGrant, SlotPolicy

log = logging.getLogger(__name__)

__all__ = ["BatchRunner", "BatchStats", "MicroBatcher"]

T = TypeVar("T")


class BatchRunner(Protocol):
    """The mechanism the batcher drives on the model thread (:class:`service.serving.slots.SlotTable`)."""

    def write(self, slot: int, artifact: PromptArtifact) -> int: ...

    def forward(self, x: Tensor, slots: Tensor, image_index: Tensor | None) -> Tensor:
        """x [M, 3, H, W] images; slots [B]; image_index [B] or None (= arange(M)) -> logits [B, K]."""
        ...


@dataclass(eq=False)
class _Request:
    prompts: list[LoadedPrompt]  # P prompts, each applied to every image
    x: Tensor  # [N, 3, H, W]
    future: asyncio.Future[list[Tensor]]  # per prompt: logits [N, K_p]
    tenant: str = ""
    deadline: float | None = None  # time.time() seconds; past it the rows are dropped, not computed
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0]) * len(self.prompts)


@dataclass
class BatchStats:
    """Counters of one batcher (for the benchmark and tests; Prometheus has the process-wide view)."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    deferred: int = 0  # requests pushed to a later batch because their prompts did not fit in slots
    stale_refused: int = 0
    expired: int = 0  # requests dropped because their deadline passed while queued
    model_seconds: float = 0.0


class MicroBatcher:
    """Collects predict requests for one backbone+device and runs them as mixed-prompt batches."""

    def __init__(
        self,
        runner: BatchRunner,
        policy: SlotPolicy,
        cache: PromptCache,
        *,
        name: str,
        max_wait_ms: float = 5.0,
        max_batch_rows: int = 64,
        executor: ThreadPoolExecutor | None = None,
        fair_quantum: int = 8,
        on_pass: Callable[[int, float], None] | None = None,
        lanes: int = 1,
        thread_nice: int = 0,
    ) -> None:
        if max_batch_rows < 1 or max_wait_ms < 0 or lanes < 1:
            raise ValueError("max_batch_rows and lanes must be >= 1 and max_wait_ms >= 0")
        self.runner = runner
        self.policy = policy
        self.cache = cache
        self.name = name
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch_rows = max_batch_rows
        self._own_executor = executor is None
        self.lanes = lanes
        # a thread per lane; the backbone keeps its per-call state per thread
        self.executor = executor or ThreadPoolExecutor(
            max_workers=lanes,
            thread_name_prefix=f"model-{name}",
            initializer=_lower_thread_priority,
            initargs=(thread_nice,),
        )
        self._bank = _SharedOrAlone()
        self._queue: FairQueue[_Request] = FairQueue(quantum=fair_quantum)
        self._on_pass = on_pass  # (rows, seconds) of each pass: admission control learns its row cost
        self._deferred: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = BatchStats()

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def aclose(self) -> None:
        """Stop taking requests, fail the queued ones with ServingClosedError, stop the model thread."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        pending = list(self._deferred)
        self._deferred.clear()
        pending.extend(self._queue.drain())
        _fail(pending, ServingClosedError("the server is shutting down"))
        if self._own_executor:  # let a running pass finish, without blocking the event loop meanwhile
            await asyncio.to_thread(self.executor.shutdown, True)

    async def run_on_model_thread(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on a model thread while no pass runs (pins, oversized prompts)."""
        loop = asyncio.get_running_loop()
        async with self._bank.alone():
            return await loop.run_in_executor(self.executor, fn, *args)

    # -- submission -------------------------------------------------------------------------------------
    async def submit(
        self,
        prompts: Sequence[LoadedPrompt],
        x: Tensor,
        *,
        tenant: str = "",
        deadline: float | None = None,
    ) -> list[Tensor]:
        """Predict ``x`` [N, 3, H, W] under each prompt; returns per prompt logits [N, K_p] (CPU, float32).

        The caller keeps ``len(prompts)`` within the slot policy's ``max_prompts_per_request``. Requests of
        one ``tenant`` share its turn in the fair queue; past ``deadline`` (``time.time()``) the rows are
        dropped with DeadlineExceededError instead of computed.
        """
        if self._closed:
            raise ServingClosedError("the server is shutting down")
        if not prompts:
            return []
        if len({p.key for p in prompts}) > self.policy.max_prompts_per_request:
            raise ValueError("more distinct prompts than the slot table can hold at once; split the request")
        self.start()
        fut: asyncio.Future[list[Tensor]] = asyncio.get_running_loop().create_future()
        req = _Request(list(prompts), x, fut, tenant=tenant, deadline=deadline)
        self._queue.put(tenant, req, req.rows)
        return await fut

    # -- the collector ----------------------------------------------------------------------------------
    async def _next(self, timeout: float | None) -> _Request | None:
        if self._deferred:
            return self._deferred.popleft()
        if timeout is not None and timeout <= 0:
            return self._queue.get_nowait()
        return await self._queue.get(timeout)

    async def _collect(self) -> list[_Request]:
        """The oldest request plus what arrives within max_wait of it, up to max_batch_rows rows."""
        first = await self._next(None)
        assert first is not None
        batch = [first]
        rows = first.rows
        deadline = first.enqueued + self.max_wait_s
        while rows < self.max_batch_rows:
            nxt = await self._next(deadline - time.perf_counter())
            if nxt is None:
                break
            if rows + nxt.rows > self.max_batch_rows:
                self._deferred.appendleft(nxt)
                break
            batch.append(nxt)
            rows += nxt.rows
        return batch

    def _admit(self, batch: list[_Request]) -> tuple[list[_Request], SlotGrant]:
        """Lease slots request by request; refuse stale ones, defer those that do not fit."""
        grant = SlotGrant()
        taken: list[_Request] = []
        left: list[_Request] = []
        now = time.time()
        for req in batch:
            if req.future.done():  # the caller went away
                continue
            if req.deadline is not None and now > req.deadline:
                self.stats.expired += 1
                _fail([req], DeadlineExceededError("the request's deadline passed while it was queued"))
                continue
            stale = next((p for p in req.prompts if not self.cache.is_current(p)), None)
            if stale is not None:
                self.stats.stale_refused += 1
                _fail([req], PromptNotFoundError(f"prompt {stale.key!r} was deleted or replaced"))
                continue
            if self.policy.try_acquire(grant, req.prompts):
                taken.append(req)
            else:
                left.append(req)
        self.stats.deferred += len(left)
        self._deferred.extendleft(reversed(left))
        return taken, grant

    async def _loop(self) -> None:
        """Collect a batch whenever a lane is free, and serve it on that lane."""
        free = asyncio.Semaphore(self.lanes)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await free.acquire()
                try:
                    batch = await self._collect()
                except BaseException:
                    free.release()
                    raise
                task = asyncio.get_running_loop().create_task(self._serve_on_lane(batch, free))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:  # shutdown: the batches on their lanes are failed by their own tasks
            for task in list(running):
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _serve_on_lane(self, batch: list[_Request], free: asyncio.Semaphore) -> None:
        try:
            await self._serve(batch)
        except asyncio.CancelledError:  # shutdown mid-batch: nobody is left to answer these
            _fail(batch, ServingClosedError("the server is shutting down"))
            raise
        except Exception as e:  # a bug here must fail this batch, not stop the collector for good
            log.exception("serving a batch failed on %s", self.name)
            _fail(batch, e)
        finally:
            free.release()

    async def _serve(self, batch: list[_Request]) -> None:
        """Admit what fits, run it on the model thread, answer each request."""
        taken, grant = self._admit(batch)
        if not taken:
            if self._deferred and self.policy.leased:
                await self.policy.wait_released()
            elif self._deferred:
                # nothing leased and still no room: submit() bounds prompts per request by the slots
                # that pins leave free, so this is a bug; fail loudly rather than spin
                _fail([self._deferred.popleft()], ServingError("no free prompt slot for this request"))
            return
        started = time.perf_counter()
        for req in taken:
            metrics.QUEUE_WAIT_SECONDS.labels(backbone=self.name).observe(started - req.enqueued)
        # per request, per prompt: (slot, number of classes) to cut the padded logits back
        slots_per_req = [[(grant.slots[p.key], p.artifact.num_classes) for p in req.prompts] for req in taken]
        loop = asyncio.get_running_loop()
        try:
            if grant.writes:  # a prompt that cannot be written fails its own requests, not the batch
                async with self._bank.alone():
                    failed = await loop.run_in_executor(self.executor, self._write_slots, grant.writes)
                if failed:
                    self.policy.forget(failed)
                    for req in taken:
                        bad = next((failed[p.key] for p in req.prompts if p.key in failed), None)
                        if bad is not None:
                            _fail([req], bad)
                    taken = [r for r in taken if not r.future.done()]
                    slots_per_req = [
                        [(grant.slots[p.key], p.artifact.num_classes) for p in req.prompts] for req in taken
                    ]
                    if not taken:
                        return
            async with self._bank.shared():
                results, seconds = await loop.run_in_executor(
                    self.executor, self._run_batch, [r.x for r in taken], slots_per_req
                )
        except Exception as e:
            log.exception("batch of %d requests failed on %s", len(taken), self.name)
            _fail(taken, e)
            return
        finally:
            self.policy.release(grant)
        rows = sum(r.rows for r in taken)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.requests += len(taken)
        self.stats.model_seconds += seconds
        if self._on_pass is not None:
            self._on_pass(rows, seconds)
        metrics.BATCH_ROWS.labels(backbone=self.name).observe(rows)
        metrics.BATCH_PROMPTS.labels(backbone=self.name).observe(len(grant.slots))
        metrics.MODEL_SECONDS.labels(backbone=self.name).observe(seconds)
        for req, out in zip(taken, results, strict=True):
            if not req.future.done():
                req.future.set_result(out)

    # -- on the model thread ----------------------------------------------------------------------------
    def _write_slots(self, writes: list[tuple[int, LoadedPrompt]]) -> dict[str, Exception]:
        """Write new residents into their slots; returns key -> error for those that could not be."""
        failed: dict[str, Exception] = {}
        for slot, prompt in writes:
            try:
                self.runner.write(slot, prompt.artifact)
            except Exception as e:  # ArtifactError, or a device error while copying
                log.warning("writing prompt %s into slot %d failed: %s", prompt.key, slot, e)
                failed[prompt.key] = e
        return failed

    def _run_batch(
        self, xs: list[Tensor], slots_per_req: list[list[tuple[int, int]]]
    ) -> tuple[list[list[Tensor]], float]:
        """One forward pass over every request's images; splits the padded logits per request and prompt."""
        t0 = time.perf_counter()
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [M, 3, H, W]
        slot_rows: list[int] = []
        image_rows: list[int] = []
        offset = 0
        for xi, slots in zip(xs, slots_per_req, strict=True):
            n = int(xi.shape[0])
            for s, _ in slots:
                slot_rows.extend([s] * n)
                image_rows.extend(range(offset, offset + n))
            offset += n
        shared = len(image_rows) != offset  # some image goes under several prompts
        slot_t = torch.tensor(slot_rows, dtype=torch.long)  # [B]
        index_t = torch.tensor(image_rows, dtype=torch.long) if shared else None  # [B]
        logits = self.runner.forward(x, slot_t, index_t).float().cpu()  # [B, max_classes]
        out: list[list[Tensor]] = []
        row = 0
        for xi, slots in zip(xs, slots_per_req, strict=True):
            n = int(xi.shape[0])
            per_prompt: list[Tensor] = []
            for _, k in slots:
                per_prompt.append(logits[row : row + n, :k])
                row += n
            out.append(per_prompt)
        return out, time.perf_counter() - t0


class _SharedOrAlone:
    """Passes share the slot table; a write has it alone (writers first, so a stream of passes cannot
    starve a pin). asyncio has no readers-writer lock; this one is a condition and two counters."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            async with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        # counted before the first await: a pass admitted from now on (it may lease the slot this write
        # fills) waits for the write, as the single model thread's FIFO order guaranteed
        self._waiting_alone += 1
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: not self._alone and not self._sharing)
                self._alone = True
        finally:
            self._waiting_alone -= 1
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()


def _lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (Linux keeps one per thread; elsewhere nothing happens)."""
    if nice > 0 and hasattr(os, "setpriority"):
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except OSError as exc:
            log.warning("could not lower the model thread's priority by %d: %s", nice, exc)


def _fail(requests: Sequence[_Request], exc: BaseException) -> None:
    for req in requests:
        if not req.future.done():
            req.future.set_exception(exc)
