"""The gateway's TTL cache: entries expire at their TTL, 0 turns it off, invalidation by predicate."""

from __future__ import annotations

from service.ttl_cache import TTLCache
from tests.fake_clock import Clock


def test_an_entry_lives_exactly_its_ttl() -> None:
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache(5.0, clock=clock)
    cache.put("a", 1)
    clock.now += 4.999
    assert cache.get("a") == 1
    clock.now += 0.001
    assert cache.get("a") is None and len(cache) == 0


def test_a_ttl_of_zero_caches_nothing() -> None:
    cache: TTLCache[str, int] = TTLCache(0.0, clock=Clock())
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_discard_where_drops_only_what_it_selects_and_size_is_bounded() -> None:
    cache: TTLCache[str, int] = TTLCache(60.0, max_entries=3, clock=Clock())
    for i, key in enumerate("abcd"):
        cache.put(key, i)
    assert len(cache) == 3 and cache.get("a") is None  # the least recently used went first
    assert cache.discard_where(lambda _, v: v % 2 == 1) == 2  # b=1, d=3
    assert cache.get("c") == 2 and cache.get("b") is None and cache.get("d") is None


def test_the_clock_can_be_swapped_after_construction() -> None:
    cache: TTLCache[str, int] = TTLCache(5.0)
    clock = Clock()
    cache.clock = clock
    cache.put("a", 1)
    clock.now += 5.0
    assert cache.get("a") is None
