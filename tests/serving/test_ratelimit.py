"""Token buckets: the in-memory one, and the Redis one against the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from service.serving.ratelimit import InMemoryRateLimiter, RedisRateLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_in_memory_bucket_refills_and_says_when() -> None:
    async def run() -> None:
        clock = Clock()
        rl = InMemoryRateLimiter(rate=2.0, burst=3.0, clock=clock)
        assert [(await rl.acquire("t1")).allowed for _ in range(3)] == [True, True, True]
        refused = await rl.acquire("t1")
        assert not refused.allowed and refused.retry_after_s == pytest.approx(0.5)
        assert refused.retry_after_header == "1"
        assert (await rl.acquire("t2")).allowed  # tenants do not share buckets
        clock.now += 0.5
        assert (await rl.acquire("t1")).allowed
        assert not (await rl.acquire("t1")).allowed
        clock.now += 10
        big = await rl.acquire("t1", cost=5)  # above the burst: allowed on a full bucket, drains it
        assert big.allowed and big.remaining == 0
        assert not (await rl.acquire("t1", cost=5)).allowed

    asyncio.run(run())


@pytest.mark.redis
def test_redis_bucket_is_shared_and_atomic() -> None:
    prefix = f"actprompt-test:{uuid.uuid4().hex}:"

    async def run() -> None:
        a = RedisRateLimiter(REDIS_URL, rate=1.0, burst=5.0, prefix=prefix)
        b = RedisRateLimiter(REDIS_URL, rate=1.0, burst=5.0, prefix=prefix)  # a second gateway
        try:
            decisions = await asyncio.gather(*(lim.acquire("tenant") for lim in [a, b] * 6))
            assert sum(d.allowed for d in decisions) == 5  # one bucket across both, no race
            refused = [d for d in decisions if not d.allowed]
            assert all(0 < d.retry_after_s <= 1.0 for d in refused)
            assert (await a.acquire("other")).allowed
            await asyncio.sleep(1.1)
            assert (await b.acquire("tenant")).allowed  # refilled by Redis's clock
            ttl = await a._redis.pttl(prefix + "tenant")
            assert 0 < ttl <= 5000 + 1000
        finally:
            await a._redis.delete(prefix + "tenant", prefix + "other")
            await a.aclose()
            await b.aclose()

    asyncio.run(run())
