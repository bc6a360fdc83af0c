"""The revalidating cache: entries in use are renewed or dropped by one check, idle ones expire, the bound
counts from the read, an invalidation during the check stands, and a failed check changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from service.revalidating_cache import RevalidatingCache
from tests.fake_clock import Clock


def make(valid: set[str], calls: list[set[str]]) -> tuple[RevalidatingCache[str, int], Clock]:
    def check(held: Mapping[str, int]) -> dict[str, bool]:
        calls.append(set(held))
        return {k: k in valid for k in held}

    clock = Clock()
    return RevalidatingCache(10.0, check, name="test", idle_s=8.0, clock=clock), clock


def test_entries_in_use_are_renewed_or_dropped_by_one_check_and_idle_ones_are_left() -> None:
    calls: list[set[str]] = []
    cache, clock = make({"a", "c"}, calls)
    for key in "abc":
        cache.put(key, ord(key), read_at=clock.now)
    clock.now += 9.0
    assert cache.get("a") == ord("a") and cache.get("b") == ord("b")  # "c" is not used again
    assert asyncio.run(cache.revalidate()) == 1  # "c" idle for 9 s (> 8): not checked
    assert calls == [{"a", "b"}]
    assert cache.get("b") is None  # no longer right: dropped before its TTL
    clock.now += 9.9  # "a" was renewed at the check: it answers until 10 s after that
    assert cache.get("a") == ord("a") and cache.get("c") is None
    clock.now += 0.1
    assert cache.get("a") is None


def test_the_bound_counts_from_the_read_not_from_when_it_was_stored() -> None:
    cache, clock = make(set(), [])
    cache.put("a", 1, read_at=clock.now - 9.0)  # read 9 s ago, stored now
    assert cache.get("a") == 1
    clock.now += 1.0
    assert cache.get("a") is None


def test_an_invalidation_during_the_check_is_not_undone() -> None:
    cache: RevalidatingCache[str, int]

    def check(held: Mapping[str, int]) -> dict[str, bool]:
        cache.discard_where(lambda k, _: k == "a")  # a deletion through this process, meanwhile
        return dict.fromkeys(held, True)

    clock = Clock()
    cache = RevalidatingCache(10.0, check, name="test", clock=clock)
    cache.put("a", 1, read_at=clock.now)
    cache.put("b", 2, read_at=clock.now)
    assert asyncio.run(cache.revalidate()) == 1
    assert cache.get("a") is None and cache.get("b") == 2


def test_a_failed_check_changes_nothing_and_entries_expire_at_their_ttl() -> None:
    def check(held: Mapping[str, int]) -> dict[str, bool]:
        raise ConnectionError("database down")

    clock = Clock()
    cache: RevalidatingCache[str, int] = RevalidatingCache(10.0, check, name="test", clock=clock)
    cache.put("a", 1, read_at=clock.now)
    with pytest.raises(ConnectionError):
        asyncio.run(cache.revalidate())
    clock.now += 9.9
    assert cache.get("a") == 1
    clock.now += 0.1
    assert cache.get("a") is None


def test_the_sweeper_revalidates_on_its_own_and_stops_when_closed() -> None:
    calls: list[set[str]] = []

    async def run() -> None:
        cache, clock = make({"a"}, calls)
        cache._entries.ttl_s = 0.1  # a real half-TTL period, short enough for a test
        cache.put("a", 1, read_at=clock.now)
        cache.start()
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        await cache.aclose()
        seen = len(calls)
        await asyncio.sleep(0.2)
        assert seen >= 1 and len(calls) == seen

    asyncio.run(run())
    assert calls[0] == {"a"}


def test_the_batched_reads_split_their_in_lists_below_the_parameter_limit() -> None:
    from service.db.repositories.base import IN_LIST_SIZE, in_lists

    values = {f"k{i:04d}" for i in range(2 * IN_LIST_SIZE + 1)}
    lists = list(in_lists(values))
    assert [len(x) for x in lists] == [IN_LIST_SIZE, IN_LIST_SIZE, 1]
    assert [v for x in lists for v in x] == sorted(values)
    assert list(in_lists(set())) == []
