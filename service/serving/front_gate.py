"""Load shedding in a front process, decided before a predict's body is read.

The engine's admission control refuses what cannot start within the queue-wait budget, but only after the
front has read, parsed and decoded the request: on a CPU host that is most of a request's cost. Past
saturation the fronts then spend their cores decoding requests that will be refused, the refusals queue
behind them, and a "fast 503" takes seconds. This gate refuses before any of that work, in two cases:

* **This front is full**: its limit of predicts between their headers and their answer is reached
  (TorchServe's and Triton's bounded queue, counted in requests because the body, and so the number of
  rows, is not known yet), and this tenant already holds its share of them (the limit over the tenants
  in flight). So a full front still takes a quiet tenant's request: one tenant cannot take every place.
  The limit is fixed (``max_in_flight``) or, by default, follows Little's law: the answers per second
  this front has been giving times ``target_s``, the time a predict should spend here, so that the
  requests it holds take about that long to drain whatever the hardware (at least ``min_in_flight``, so
  that a front starting from rest admits enough to learn its rate).
* **The engine just refused this tenant**: it said by how much the tenant's expected wait exceeds the
  budget; until that time has passed (at least ``min_hold_s``, at most ``max_hold_s``), the tenant's
  further predicts are refused here. The floor keeps a saturated front from decoding a request for every
  few milliseconds the queue drains; the engine's queue holds a whole budget of work, so it does not run
  dry meanwhile. Keyed by tenant, so the engine's fair share carries over: a flooding tenant is shed at
  the door while a quiet one still gets through.

A refusal carries the seconds to wait, for ``Retry-After``. Everything here runs on one event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.serving import metrics

__all__ = ["FrontGate", "Shed"]


@dataclass(frozen=True)
class Shed:
    """Why a predict was refused at the door, and when to come back."""

    reason: str  # "front_full" | "tenant_overloaded"
    retry_after_s: float
    message: str


class FrontGate:
    def __init__(
        self,
        *,
        max_in_flight: int = 0,
        target_s: float = 0.125,
        min_in_flight: int = 16,
        rate_window_s: float = 0.5,
        min_hold_s: float = 0.1,
        max_hold_s: float = 0.5,
        max_tenants: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight  # > 0: a fixed limit; 0: adaptive (see limit)
        self.target_s = target_s
        self.min_in_flight = min_in_flight
        self.rate_window_s = rate_window_s
        self.min_hold_s = min(min_hold_s, max_hold_s)
        self.max_hold_s = max_hold_s
        self.max_tenants = max_tenants
        self.in_flight = 0
        self.rate = 0.0  # answers per second, smoothed over windows of rate_window_s
        self._answered = 0  # answers in the window under way
        self._window_start = clock()
        self._held: dict[str | None, int] = {}  # tenant (None: not known yet) -> places it holds
        self._closed_until: dict[str, float] = {}  # tenant -> clock time its predicts are admitted again
        self._clock = clock

    @property
    def limit(self) -> int:
        """Predicts this front takes at once: fixed, or its recent answers/s x the target time here."""
        if self.max_in_flight:
            return self.max_in_flight
        return max(self.min_in_flight, math.ceil(self.rate * self.target_s))

    def enter(self, tenant: str | None) -> Shed | None:
        """Take a place for one predict (``leave`` gives it back), or the reason it is refused now."""
        shed = self.refusal(tenant)
        if shed is None:
            self.in_flight += 1
            self._held[tenant] = self._held.get(tenant, 0) + 1
        return shed

    def refusal(self, tenant: str | None) -> Shed | None:
        """Why this tenant's predict would be refused now (counted as shed), or None; takes no place."""
        if tenant is not None and self._closed_until:
            until = self._closed_until.get(tenant)
            if until is not None:
                left = until - self._clock()
                if left > 0:
                    return self._shed(
                        "tenant_overloaded",
                        "the server is at capacity for this tenant's traffic",
                        left,
                    )
                del self._closed_until[tenant]
        held = self._held.get(tenant, 0)
        limit = self.limit
        if self.in_flight >= limit:
            share = limit / (len(self._held) + (held == 0))
            if held >= share:
                return self._shed(
                    "front_full",
                    f"this server process has {self.in_flight} predicts in progress, {held} of them yours",
                    1.0,
                )
        return None

    def leave(self, tenant: str | None) -> None:
        """Give back the place ``enter(tenant)`` took (its predict was answered)."""
        self.in_flight -= 1
        self._answered += 1
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed >= self.rate_window_s:  # a window closes: half its rate, half the history
            self.rate = 0.5 * self.rate + 0.5 * self._answered / elapsed
            self._answered, self._window_start = 0, now
        held = self._held.get(tenant, 0) - 1
        if held > 0:
            self._held[tenant] = held
        else:
            self._held.pop(tenant, None)

    def engine_refused(self, tenant: str, excess_s: float) -> None:
        """The engine refused ``tenant``: its expected wait was ``excess_s`` over the budget."""
        hold = min(max(excess_s, self.min_hold_s), self.max_hold_s)
        if len(self._closed_until) >= self.max_tenants:
            now = self._clock()
            self._closed_until = {t: u for t, u in self._closed_until.items() if u > now}
            if len(self._closed_until) >= self.max_tenants:
                return  # a bounded map: under a storm of tenants the engine's own refusal still holds
        until = self._clock() + hold
        self._closed_until[tenant] = max(until, self._closed_until.get(tenant, 0.0))

    def _shed(self, reason: str, why: str, retry_after_s: float) -> Shed:
        metrics.SHED.labels(reason=reason).inc()
        return Shed(
            reason,
            retry_after_s,
            f"{why}; refused before reading the request, retry in {max(1, math.ceil(retry_after_s))} s",
        )
