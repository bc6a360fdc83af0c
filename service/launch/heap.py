"""Keep Python's cyclic garbage collector off a serving process's latency.

A front or the engine imports torch, timm, FastAPI, SQLAlchemy and pydantic before its first request:
hundreds of thousands of objects that live as long as the process. A full (generation-2) collection
walks every one of them, and under load requests allocate fast enough to trigger one every few seconds.
On the 2-core benchmark machine each stopped a front's event loop for 230-530 ms at once, which was the
whole tail of the latency under overload, refusals included (they wait on the same loop).

``gc.freeze()`` once start-up is done moves those objects into a permanent generation that collections
skip; what requests allocate is still collected as before. ``thaw`` undoes it when an app shuts down, so
a process that builds many apps (the test suite) still collects what each left behind.

Pauses of generations 1 and 2 are exported as ``actprompt_gc_pause_seconds`` (generation 0 runs hundreds
of times a second for microseconds: observing it would cost more than it tells).
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Histogram

__all__ = ["GC_PAUSE_SECONDS", "freeze_startup_heap", "thaw", "watch_pauses"]

GC_PAUSE_SECONDS = Histogram(
    "actprompt_gc_pause_seconds",
    "Time one cyclic garbage collection of generation 1 or 2 held this process (its event loop included).",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

_started: list[float] = [0.0]


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    generation = info["generation"]
    if generation == 0:
        return
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        GC_PAUSE_SECONDS.labels(generation=str(generation)).observe(time.perf_counter() - _started[0])


def watch_pauses() -> None:
    """Export this process's collection pauses (idempotent)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def freeze_startup_heap() -> int:
    """Move every object alive now out of the collector's sight; returns how many.

    Only the young generations are collected first: a full collection here costs ~170 ms per app start
    (the test suite starts hundreds), and the old cycles it would free are start-up leftovers of no size.
    """
    gc.collect(1)
    gc.freeze()
    watch_pauses()
    return gc.get_freeze_count()


def thaw() -> None:
    """Give the frozen objects back to the collector (an app that shuts down in a longer process)."""
    gc.unfreeze()
