"""A small thread-safe map whose entries expire: the gateway's short-lived caches of database answers.

Why a TTL and not only explicit invalidation: an API process learns of a change made by *another* process
(a key revoked, a prompt deleted or a new version trained by a worker) only by asking the database again,
so the TTL is the documented upper bound on how long such a change can go unnoticed. Changes made through
this process are invalidated at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """key -> value for ``ttl_s`` seconds, at most ``max_entries`` (least recently stored dropped first)."""

    def __init__(
        self, ttl_s: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()  # sync routes call in from worker threads, async ones from the loop

    def get(self, key: K) -> V | None:
        if self.ttl_s <= 0:
            return None
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._data[key]
                return None
            return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._data[key] = (self.clock() + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def discard_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry the predicate selects (explicit invalidation); returns how many."""
        with self._lock:
            doomed = [k for k, (_, v) in self._data.items() if predicate(k, v)]
            for k in doomed:
                del self._data[k]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
