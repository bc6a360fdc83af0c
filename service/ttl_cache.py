"""A thread-safe map whose entries expire: the gateway's short-lived caches of database answers.

Why a TTL and not only explicit invalidation: an API process learns of a change made by *another* process
(a key revoked, a prompt deleted or a new version trained by a worker) only by asking the database again,
so the TTL is the documented upper bound on how long such a change can go unnoticed. Changes made through
this process are invalidated at once (`discard_where`).

The expiry and the size bound are `cachetools.TTLCache`'s; this wrapper adds the lock (sync routes call in
from worker threads, async ones from the loop), "a TTL of 0 turns the cache off", and invalidation by
predicate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import cachetools

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """key -> value for ``ttl_s`` seconds, at most ``max_entries`` (least recently used dropped first)."""

    def __init__(
        self, ttl_s: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock  # read at each access, so a test can swap in its own
        self._data: cachetools.TTLCache[K, V] = cachetools.TTLCache(
            maxsize=max_entries, ttl=max(ttl_s, 0.0), timer=lambda: self.clock()
        )
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        if self.ttl_s <= 0:
            return None
        with self._lock:
            return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._data[key] = value

    def discard(self, key: K) -> None:
        with self._lock:
            self._data.pop(key, None)

    def discard_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry the predicate selects (explicit invalidation); returns how many."""
        with self._lock:
            doomed = [k for k, v in self._data.items() if predicate(k, v)]
            for k in doomed:
                del self._data[k]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
