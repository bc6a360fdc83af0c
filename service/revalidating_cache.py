"""A TTL cache whose entries in use are checked again before they expire: in batches, off the request path.

The gateway remembers database answers (an API key's principal, a prompt reference's handle) for a TTL,
the documented bound on how long a change made by another process can go unnoticed. Plain expiry puts a
database read on the path of the first request after each TTL, once per entry: with many tenants or a
long-tailed mix of prompts, most uses come after an expiry. Here a background task takes every entry used
in the last ``idle_s``, every half TTL, asks ``check`` (one batched read) which are still right, renews
those and drops the others. An entry's age counts from the read its value came from (a renewal is such a
read), so the bound is the same as with plain expiry; entries idle longer simply expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

from service.ttl_cache import TTLCache

__all__ = ["RevalidatingCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("actprompt.cache")


class RevalidatingCache(Generic[K, V]):
    """key -> value for ``ttl_s`` seconds from its read, renewed while in use and still right."""

    def __init__(
        self,
        ttl_s: float,
        check: Callable[[Mapping[K, V]], Mapping[K, bool]],
        *,
        name: str,
        idle_s: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check  # blocking (runs in a thread): which of these entries are still right
        self.name = name
        self.idle_s = idle_s
        self._entries: TTLCache[K, tuple[V, float]] = TTLCache(ttl_s, max_entries=max_entries, clock=clock)
        self._used: dict[K, float] = {}  # key -> when it was last read or used
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def ttl_s(self) -> float:
        return self._entries.ttl_s

    @property
    def clock(self) -> Callable[[], float]:
        return self._entries.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:  # a test swaps in its own
        self._entries.clock = clock

    def get(self, key: K) -> V | None:
        now = self.clock()
        hit = self._entries.get(key)
        if hit is None or now - hit[1] >= self.ttl_s:  # the age counts from the read, not the renewal
            return None
        self._used[key] = now
        return hit[0]

    def put(self, key: K, value: V, read_at: float) -> None:
        """``value`` as read from the database at ``read_at`` (this cache's clock, taken before the read)."""
        self._entries.put(key, (value, read_at))
        self._used[key] = read_at

    def discard_where(self, predicate: Callable[[K, V], bool]) -> int:
        return self._entries.discard_where(lambda k, v: predicate(k, v[0]))

    def clear(self) -> None:
        self._entries.clear()
        self._used.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        """Revalidate in the background from now on (call on the event loop that serves the requests)."""
        if self._sweeper is None and self.ttl_s > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 2)
            try:
                await self.revalidate()
            except Exception:  # the database is down: the entries expire at their TTL, as without this
                log.warning("cached %s could not be revalidated", self.name, exc_info=True)

    async def revalidate(self) -> int:
        """Renew each recently used entry that is still right, drop the others; returns how many were
        renewed. The map is updated on the loop after the check, so an invalidation meanwhile (a
        ``discard_where`` from a request) is not undone."""
        now = self.clock()
        self._used = {k: t for k, t in self._used.items() if now - t < self.idle_s}
        held = {k: hit for k in self._used if (hit := self._entries.get(k)) is not None}
        if not held:
            return 0
        right = await asyncio.to_thread(self._check, {k: hit[0] for k, hit in held.items()})
        renewed = 0
        for key, (value, _) in held.items():
            hit = self._entries.get(key)
            if hit is None or hit[0] is not value:  # dropped or replaced meanwhile
                continue
            if right.get(key, False):
                self._entries.put(key, (value, now))
                renewed += 1
            else:
                self._entries.discard(key)
        return renewed
