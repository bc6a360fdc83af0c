"""The cache policy on its own: host LRU in bytes, single-flight loads, invalidation, pins, slot leases."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from service.engine.artifacts import PromptArtifact
from service.serving.cache import LoadedPrompt, MemorySource, PromptCache
from service.serving.errors import PinLimitError, PromptNotFoundError
from service.serving.slots import SlotGrant, SlotPolicy


class GatedSource(MemorySource):
    """A MemorySource whose reads of `gated` keys wait for `release`: the test decides what overlaps."""

    def __init__(self, data: dict[str, bytes], gated: set[str]) -> None:
        super().__init__(data)
        self.gated = gated
        self.started = asyncio.Event()  # a gated read has begun
        self.release = asyncio.Event()

    async def load(self, key: str) -> bytes:
        if key in self.gated:
            self.started.set()
            await self.release.wait()
        return await super().load(key)


@pytest.fixture()
def blobs(make_artifact: Callable[..., PromptArtifact]) -> dict[str, bytes]:
    return {f"p{i}": make_artifact(i).to_bytes() for i in range(6)}


def test_host_tier_is_lru_bounded_in_bytes(blobs: dict[str, bytes]) -> None:
    size = len(blobs["p0"])
    assert all(len(b) == size for b in blobs.values())

    async def run() -> None:
        cache = PromptCache(MemorySource(blobs), max_bytes=3 * size)
        for k in ("p0", "p1", "p2"):
            await cache.get(k)
        await cache.get("p0")  # p1 is now least recently used
        await cache.get("p3")
        assert "p1" not in cache and {"p0", "p2", "p3"} <= {k for k in blobs if k in cache}
        assert cache.resident_bytes == 3 * size <= cache.max_bytes
        assert cache.stats.evictions == 1 and cache.stats.misses == 4 and cache.stats.hits == 1
        loaded = await cache.get("p1")  # evicted entries load again, correctly
        assert loaded.artifact.to_bytes() == blobs["p1"]

    asyncio.run(run())


def test_concurrent_misses_load_once_and_do_not_block_hits(blobs: dict[str, bytes]) -> None:
    async def run() -> None:
        source = GatedSource(blobs, gated={"p1"})
        cache = PromptCache(source, max_bytes=1 << 30)
        await cache.get("p0")
        loads = [asyncio.ensure_future(cache.get("p1")) for _ in range(5)]
        await source.started.wait()  # p1's single load is in flight, held
        hit = await cache.get("p0")  # served while p1 is still loading
        assert hit.key == "p0"
        assert not any(f.done() for f in loads)
        source.release.set()
        results = await asyncio.gather(*loads)
        assert source.loads == 2  # p0 once, p1 once for five callers
        assert all(r is results[0] for r in results)

    asyncio.run(run())


def test_invalidate_drops_entry_and_a_load_racing_it(blobs: dict[str, bytes]) -> None:
    async def run() -> None:
        source = GatedSource(blobs, gated={"p1"})
        cache = PromptCache(source, max_bytes=1 << 30)
        first = await cache.get("p0")
        cache.invalidate("p0")
        assert "p0" not in cache and not cache.is_current(first)
        racing = asyncio.ensure_future(cache.get("p1"))
        await source.started.wait()
        cache.invalidate("p1")  # deleted while its load was in flight
        source.release.set()
        old = await racing
        assert not cache.is_current(old) and "p1" not in cache
        del source.data["p1"]
        with pytest.raises(PromptNotFoundError):
            await cache.get("p1")

    asyncio.run(run())


def test_pins_survive_pressure_and_are_bounded(blobs: dict[str, bytes]) -> None:
    size = len(blobs["p0"])

    async def run() -> None:
        cache = PromptCache(MemorySource(blobs), max_bytes=2 * size)
        await cache.pin("p0", max_pinned_bytes=size)
        with pytest.raises(PinLimitError):
            await cache.pin("p1", max_pinned_bytes=size)
        for k in ("p2", "p3", "p4"):
            await cache.get(k)
        assert "p0" in cache and cache.resident_bytes <= cache.max_bytes
        assert cache.unpin("p0")
        await cache.get("p5")
        await cache.get("p2")
        assert "p0" not in cache

    asyncio.run(run())


def _loaded(key: str, art: PromptArtifact, gen: int = 0) -> LoadedPrompt:
    return LoadedPrompt(key=key, artifact=art, generation=gen, nbytes=1000)


def test_slot_policy_leases_evicts_lru_and_defers(make_artifact: Callable[..., PromptArtifact]) -> None:
    art = make_artifact(0)
    p = {k: _loaded(k, art) for k in "abcdef"}

    async def run() -> None:
        policy = SlotPolicy(3, max_pinned=1)
        g1 = SlotGrant()
        assert policy.try_acquire(g1, [p["a"], p["b"]])
        assert len(g1.writes) == 2 and set(g1.slots) == {"a", "b"}
        assert policy.try_acquire(g1, [p["a"], p["c"]])  # a is a hit inside the same batch
        assert not policy.try_acquire(g1, [p["d"]])  # all three slots leased: wait, do not evict
        policy.release(g1)
        g2 = SlotGrant()
        assert policy.try_acquire(g2, [p["b"], p["d"]])  # b hit; d evicts a (least recently used)
        assert g2.writes == [(g1.slots["a"], p["d"])] and "a" not in policy and "c" in policy
        # invalidating a leased key frees its slot only on release, and a new lease cannot reuse it
        policy.invalidate("d")
        g3 = SlotGrant()
        assert policy.try_acquire(g3, [p["e"]])
        assert g3.slots["e"] == g1.slots["c"]
        assert not policy.try_acquire(g3, [p["f"]])
        policy.release(g2)
        policy.release(g3)
        slot, must_write = policy.pin(p["e"])
        assert slot == g3.slots["e"] and not must_write
        with pytest.raises(PinLimitError):
            policy.pin(p["b"])
        g4 = SlotGrant()
        assert policy.try_acquire(g4, [p["a"], p["f"]]) and "e" in policy  # pinned e is never evicted
        policy.release(g4)

    asyncio.run(run())
