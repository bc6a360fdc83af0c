"""Admission control for one backbone's model thread: a work-bounded queue, deadlines and a fair share.

Triton's queue policies and TorchServe's 503-when-full, in rows (image x prompt), the unit a forward pass
costs:

* **Bounded in expected work.** :class:`Admission` counts the rows each tenant has admitted and not yet
  finished, and learns what a pass costs from the passes it measures: seconds = per-pass overhead + rows x
  per-row cost, fitted by least squares with exponential forgetting (so a burst after quiet single-row
  passes is not priced as if each row paid a whole pass; until a second batch size has been seen, the mean
  pass is split between a fixed part and its rows as if it were a full batch's cost: a burst after quiet
  single rows is under-priced for a pass or two rather than refused outright). A
  request whose expected wait before its first row runs exceeds the queue-wait budget is refused at once
  with :class:`OverloadedError` and a retry hint, instead of waiting behind a queue that only grows. A
  request with nothing ahead of it is always admitted, however big.
* **Deadlines.** A request may carry an absolute deadline (``time.time()`` seconds, comparable across the
  processes of one host). If the estimate already overshoots it the request is refused at once; rows still
  queued when it passes are dropped before they are computed (:class:`DeadlineExceededError`).
* **Fair share.** :class:`FairQueue` keeps one FIFO per tenant and serves them by deficit round robin
  (``quantum`` rows per turn), so a tenant that sends 90 % of the load gets its share, not the whole
  model, while others wait. The wait estimate follows the same rule: ahead of a tenant's new request are
  its own queued rows plus, from each other tenant, at most as many rows as it will itself have queued.

Everything here runs on the engine's event loop (no locks).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.serving import metrics
from service.serving.errors import DeadlineExceededError, OverloadedError

__all__ = ["Admission", "FairQueue", "Ticket"]

T = TypeVar("T")


@dataclass(eq=False)
class Ticket:
    """Rows a request was admitted with; hand it back to :meth:`Admission.release` when it finished."""

    tenant: str
    rows: int
    released: bool = False


class Admission:
    """Admits or refuses requests by their expected queue wait, from a learnt per-row cost."""

    def __init__(
        self,
        *,
        budget_s: float,
        name: str = "default",
        batch_rows: int = 64,
        initial_row_s: float = 0.002,
        smoothing: float = 0.1,
        lanes: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if budget_s <= 0 or lanes < 1:
            raise ValueError("budget_s must be positive and lanes at least 1")
        self.budget_s = budget_s
        self.lanes = lanes  # passes that run at once: the queue drains that many times faster
        self.name = name
        self.batch_rows = max(1, batch_rows)
        self.row_s = initial_row_s  # seconds one more row adds to a pass
        self.pass_s = 0.0  # seconds a pass costs whatever its rows
        self._smoothing = smoothing
        self._fit = [0.0] * 5  # exponentially weighted sums of 1, rows, seconds, rows^2, rows x seconds
        self._clock = clock
        self._backlog: dict[str, int] = {}  # tenant -> rows admitted and not finished
        self.refused = 0

    @property
    def rows(self) -> int:
        return sum(self._backlog.values())

    def observe(self, rows: int, seconds: float) -> None:
        """One measured pass: refit seconds = pass_s + rows x row_s (older passes weigh less and less)."""
        if rows <= 0 or seconds <= 0:
            return
        keep = 1.0 - self._smoothing
        x, y = float(rows), seconds
        w, sx, sy, sxx, sxy = (
            keep * v + d for v, d in zip(self._fit, (1.0, x, y, x * x, x * y), strict=True)
        )
        self._fit = [w, sx, sy, sxx, sxy]
        spread = w * sxx - sx * sx
        slope = (w * sxy - sx * sy) / spread if spread > 1e-9 * w * sxx else -1.0
        if slope > 0 and (sy - slope * sx) >= 0:
            self.row_s, self.pass_s = slope, (sy - slope * sx) / w
        else:  # one batch size seen so far (or noise): spread the mean pass over a full batch's rows
            self.row_s = sy / (w * self.batch_rows)
            self.pass_s = max(0.0, (sy - sx * self.row_s) / w)

    def expected_wait_s(self, tenant: str, rows: int) -> float:
        """Seconds before a new request of ``tenant`` with ``rows`` rows starts, under the fair share."""
        own = self._backlog.get(tenant, 0)
        ahead = own + sum(min(n, own + rows) for t, n in self._backlog.items() if t != tenant)
        return (math.ceil(ahead / self.batch_rows) * self.pass_s + ahead * self.row_s) / self.lanes

    def admit(self, tenant: str, rows: int, deadline: float | None = None) -> Ticket:
        """A ticket for ``rows`` rows, or OverloadedError / DeadlineExceededError at once."""
        wait = self.expected_wait_s(tenant, rows)
        if deadline is not None and self._clock() + wait > deadline:
            self._refuse(tenant, "deadline")
            raise DeadlineExceededError(
                f"the deadline passes before the rows can start (expected wait {wait * 1000:.0f} ms)"
            )
        if wait > self.budget_s and self.rows > 0:
            self._refuse(tenant, "overloaded")
            retry = max(1.0, math.ceil(wait - self.budget_s))
            raise OverloadedError(
                f"the server is at capacity (expected queue wait {wait * 1000:.0f} ms, budget "
                f"{self.budget_s * 1000:.0f} ms); retry in {retry:.0f} s",
                retry_after_s=retry,
                excess_s=wait - self.budget_s,
            )
        self._backlog[tenant] = self._backlog.get(tenant, 0) + rows
        self._set_gauge()
        return Ticket(tenant, rows)

    def release(self, ticket: Ticket) -> None:
        """The request finished (answered, failed or dropped): its rows leave the backlog."""
        if ticket.released:
            return
        ticket.released = True
        left = self._backlog.get(ticket.tenant, 0) - ticket.rows
        if left > 0:
            self._backlog[ticket.tenant] = left
        else:
            self._backlog.pop(ticket.tenant, None)
        self._set_gauge()

    def _refuse(self, tenant: str, reason: str) -> None:
        self.refused += 1
        metrics.REFUSED.labels(tenant=metrics.tenant_label(tenant), reason=reason).inc()

    def _set_gauge(self) -> None:
        metrics.QUEUE_ROWS.labels(backbone=self.name).set(self.rows)


class FairQueue(Generic[T]):
    """Per-tenant FIFO queues served by deficit round robin over rows; ``get`` awaits like asyncio.Queue."""

    def __init__(self, *, quantum: int = 8) -> None:
        if quantum < 1:
            raise ValueError("quantum must be at least 1")
        self.quantum = quantum
        self._queues: dict[str, deque[tuple[T, int]]] = {}
        self._active: deque[str] = deque()  # tenants with queued items, in round-robin order
        self._deficit: dict[str, int] = {}
        self._nonempty = asyncio.Event()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def put(self, tenant: str, item: T, rows: int) -> None:
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
            self._active.append(tenant)
            self._deficit[tenant] = 0
        q.append((item, max(1, rows)))
        self._len += 1
        self._nonempty.set()

    def get_nowait(self) -> T | None:
        """The next item in deficit-round-robin order, or None when every queue is empty."""
        while self._active:
            tenant = self._active[0]
            q = self._queues[tenant]
            item, rows = q[0]
            if self._deficit[tenant] >= rows:
                q.popleft()
                self._len -= 1
                self._deficit[tenant] -= rows
                if not q:  # an idle tenant keeps no credit (DRR)
                    del self._queues[tenant], self._deficit[tenant]
                    self._active.popleft()
                return item
            self._deficit[tenant] += self.quantum
            self._active.rotate(-1)
        self._nonempty.clear()
        return None

    async def get(self, timeout: float | None = None) -> T | None:
        """The next item, waiting up to ``timeout`` seconds (None: forever) for one to arrive."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                return None
            try:  # asyncio.timeout, not wait_for: no extra task per wait (the collector waits per request)
                async with asyncio.timeout(left):
                    await self._nonempty.wait()
            except TimeoutError:
                return None

    def drain(self) -> list[T]:
        """Every queued item, emptying the queue (shutdown)."""
        items = [item for q in self._queues.values() for item, _ in q]
        self._queues.clear()
        self._active.clear()
        self._deficit.clear()
        self._len = 0
        self._nonempty.clear()
        return items
