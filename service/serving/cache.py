"""The prompt cache *policy*: which artifacts are resident, in host memory and in device slots.

Three tiers, as in LoRAX / vLLM's LoRA manager, with the policy kept apart from the mechanism:

* database: the source of truth, read through a :class:`PromptSource` on a miss (the gateway supplies a
  DB-backed one; the serving layer never imports the database);
* host memory: :class:`PromptCache`, decoded :class:`PromptArtifact` objects, LRU, bounded in bytes;
* device: :class:`service.serving.slots.SlotPolicy`, which prompt sits in which row of a backbone's slot
  table, LRU over slots that no running batch leases and nobody pinned.

Every method here runs on the event loop (no locks); only the slot *writes* run on the model thread.
Stale serving is ruled out by a per-key generation: :meth:`PromptCache.invalidate` bumps it and drops
every tier's copy, a load that finishes after an invalidation is not cached, and the batcher refuses a
request whose prompt was loaded under an older generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from service.engine.artifacts import PromptArtifact
from service.serving import metrics
from service.serving.errors import PinLimitError, PromptNotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "CacheStats",
    "CallableSource",
    "LoadedPrompt",
    "MemorySource",
    "PromptCache",
    "PromptSource",
]


@runtime_checkable
class PromptSource(Protocol):
    """Loads an artifact's bytes by internal key on a cache miss (the loader interface of LoRAX).

    Raises :class:`PromptNotFoundError` when the key names no stored artifact (deleted or never there).
    The key is internal: tenant-facing ids are resolved and authorised by the gateway before we see them.
    """

    async def load(self, key: str) -> bytes: ...


class CallableSource:
    """Adapts a blocking ``key -> bytes`` function (a synchronous DB session) by running it in a thread."""

    def __init__(self, fn: Callable[[str], bytes]) -> None:
        self._fn = fn

    async def load(self, key: str) -> bytes:
        return await asyncio.to_thread(self._fn, key)


class MemorySource:
    """A dict-backed source (embedded tools, benchmarks, tests); ``pop`` a key to delete it."""

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data: dict[str, bytes] = dict(data or {})
        self.loads = 0

    async def load(self, key: str) -> bytes:
        self.loads += 1
        try:
            return self.data[key]
        except KeyError:
            raise PromptNotFoundError(f"no prompt {key!r}") from None


@dataclass(frozen=True)
class LoadedPrompt:
    """A decoded artifact as the cache handed it out; ``generation`` says which version of the key it is."""

    key: str
    artifact: PromptArtifact
    generation: int
    nbytes: int  # serialized size: what the host tier counts against its budget


@dataclass
class CacheStats:
    """Counters of one cache instance (the Prometheus metrics aggregate over all of them)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bypassed: int = 0  # loaded and served but too big to keep (every resident byte pinned)
    # cold loads (source read + decode), the latest ones only: a long-running server must not grow it forever
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def to_dict(self) -> dict[str, float | int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bypassed": self.bypassed,
            "loads": len(self.load_seconds),
        }


class PromptCache:
    """Host-memory tier: decoded artifacts by internal key, LRU, bounded in bytes, with pins and preload.

    A miss loads from the source in its own task (single flight per key), so the requests for other,
    resident prompts keep flowing into batches meanwhile; the caller that waits holds its own reference to
    the artifact, so evicting it from this tier never fails an in-flight request.
    """

    def __init__(
        self,
        source: PromptSource,
        *,
        max_bytes: int,
        decode: Callable[[bytes], PromptArtifact] = PromptArtifact.from_bytes,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._source = source
        self._decode = decode
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LoadedPrompt] = OrderedDict()  # LRU first
        self._pinned: set[str] = set()
        self._loading: dict[str, asyncio.Task[LoadedPrompt]] = {}
        self._generation: dict[str, int] = {}
        self._listeners: list[Callable[[str], None]] = []
        self.resident_bytes = 0
        self.stats = CacheStats()

    # -- reads ----------------------------------------------------------------------------------------
    def generation(self, key: str) -> int:
        """The key's current generation; a :class:`LoadedPrompt` with an older one must not be served."""
        return self._generation.get(key, 0)

    def is_current(self, prompt: LoadedPrompt) -> bool:
        return prompt.generation == self.generation(prompt.key)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    async def get(self, key: str) -> LoadedPrompt:
        """The artifact for ``key``: from memory, or loaded from the source (raises PromptNotFoundError)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            metrics.CACHE_HITS.labels(tier="host").inc()
            return entry
        task = self._loading.get(key)
        if task is None:
            self.stats.misses += 1
            metrics.CACHE_MISSES.labels(tier="host").inc()
            task = asyncio.ensure_future(self._load(key, self.generation(key)))
            task.add_done_callback(_retrieve_exception)
            self._loading[key] = task
        # shield: a caller that goes away (client disconnect) must not cancel the load others wait on
        return await asyncio.shield(task)

    async def _load(self, key: str, generation: int) -> LoadedPrompt:
        t0 = time.perf_counter()
        try:
            data = await self._source.load(key)
            artifact = await asyncio.to_thread(self._decode, data)
        finally:
            if self._loading.get(key) is asyncio.current_task():
                del self._loading[key]
        seconds = time.perf_counter() - t0
        self.stats.load_seconds.append(seconds)
        metrics.CACHE_LOAD_SECONDS.observe(seconds)
        loaded = LoadedPrompt(key=key, artifact=artifact, generation=generation, nbytes=len(data))
        if generation == self.generation(key):  # else invalidated while loading: hand out, never cache
            self._insert(loaded)
        return loaded

    # -- writes ---------------------------------------------------------------------------------------
    def _insert(self, loaded: LoadedPrompt) -> None:
        old = self._entries.pop(loaded.key, None)
        if old is not None:
            self.resident_bytes -= old.nbytes
        if not self._make_room(loaded.nbytes):
            self.stats.bypassed += 1
            self._set_bytes_gauge()
            return
        self._entries[loaded.key] = loaded
        self.resident_bytes += loaded.nbytes
        self._set_bytes_gauge()

    def _make_room(self, nbytes: int) -> bool:
        """Evict unpinned entries, least recently used first, until ``nbytes`` more fit."""
        if self.resident_bytes + nbytes <= self.max_bytes:
            return True
        victims: list[str] = []
        freed = 0
        for key, entry in self._entries.items():
            if self.resident_bytes - freed + nbytes <= self.max_bytes:
                break
            if key not in self._pinned:
                victims.append(key)
                freed += entry.nbytes
        if self.resident_bytes - freed + nbytes > self.max_bytes:
            return False
        for key in victims:
            self.resident_bytes -= self._entries.pop(key).nbytes
        self.stats.evictions += len(victims)
        metrics.CACHE_EVICTIONS.labels(tier="host").inc(len(victims))
        return True

    def _set_bytes_gauge(self) -> None:
        metrics.CACHE_BYTES.labels(tier="host").set(self.resident_bytes)

    def invalidate(self, key: str) -> None:
        """Forget ``key`` in every tier now (call it after the deletion or replacement committed)."""
        self._generation[key] = self.generation(key) + 1
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.resident_bytes -= entry.nbytes
            self._set_bytes_gauge()
        self._pinned.discard(key)
        self._loading.pop(key, None)  # its waiters still get the old result, later callers load anew
        for listener in self._listeners:
            listener(key)

    def add_invalidation_listener(self, listener: Callable[[str], None]) -> None:
        """Device tiers register here so that an invalidation drops their slot too."""
        self._listeners.append(listener)

    async def pin(self, key: str, *, max_pinned_bytes: int | None = None) -> LoadedPrompt:
        """Keep ``key`` in host memory until :meth:`unpin` (the device tier pins its slot separately)."""
        loaded = await self.get(key)
        if not self.is_current(loaded):
            raise PromptNotFoundError(f"prompt {key!r} was deleted or replaced")
        limit = self.max_bytes if max_pinned_bytes is None else min(max_pinned_bytes, self.max_bytes)
        pinned_bytes = sum(self._entries[k].nbytes for k in self._pinned if k in self._entries)
        if key not in self._pinned and pinned_bytes + loaded.nbytes > limit:
            raise PinLimitError(f"pinning {key!r} would exceed the pinned host budget of {limit} bytes")
        if key not in self._entries:
            self._insert(loaded)
        self._pinned.add(key)
        return loaded

    def unpin(self, key: str) -> bool:
        """Let ``key`` be evicted again; returns whether it was pinned."""
        was = key in self._pinned
        self._pinned.discard(key)
        return was


def _retrieve_exception(task: asyncio.Task[LoadedPrompt]) -> None:
    """Marks a failed load's exception as seen when every waiter went away before it finished."""
    if not task.cancelled():
        task.exception()
