"""Token buckets: the in-memory one, and the Redis one against the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.serving.ratelimit import InMemoryRateLimiter, RedisRateLimiter
from tests.fake_clock import Clock

REDIS_URL = "redis://127.0.0.1:6379/0"


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


def _counter(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


class CountingScript:
    """Counts the limiter's calls into Redis (the real script still runs)."""

    def __init__(self, script: object) -> None:
        self.script = script
        self.calls = 0

    async def __call__(self, **kw: object) -> object:
        self.calls += 1
        return await self.script(**kw)  # type: ignore[operator]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private redis-server on a free port (it is SIGSTOPped, so never the shared one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait()


@pytest.mark.redis
def test_hung_redis_opens_the_breaker_and_limits_per_process(
    redis_server: tuple[str, subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    url, proc = redis_server
    clock = Clock()

    async def run() -> None:
        rl = RedisRateLimiter(url, rate=1.0, burst=5.0, prefix="t:", cooldown_s=2.0, clock=clock)
        counting = CountingScript(rl._script)
        rl._script = counting  # type: ignore[assignment]
        try:
            assert (await rl.acquire("a")).allowed and counting.calls == 1
            outages, fallback = (
                _counter("actprompt_rate_limit_redis_outages_total"),
                _counter("actprompt_rate_limit_fallback_total"),
            )
            os.kill(proc.pid, signal.SIGSTOP)  # hung: connections stay open, nothing answers
            decisions = [await rl.acquire("a") for _ in range(8)]
            # one call waited for Redis; every later one was decided locally without asking it
            assert counting.calls == 2
            assert not rl.redis_available
            # the per-process fallback still limits: its own bucket of 5 (not fail-open)
            assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
            assert _counter("actprompt_rate_limit_redis_outages_total") == outages + 1
            assert _counter("actprompt_rate_limit_fallback_total") == fallback + 8
            logged = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
            assert len(logged) == 1  # once per outage, not per request
            os.kill(proc.pid, signal.SIGCONT)
            clock.now += 1.0  # breaker still open: no probe yet
            await rl.acquire("b")
            assert counting.calls == 2
            clock.now += 1.5  # past the cooldown: one probe, Redis answers, shared limits again
            assert (await rl.acquire("b")).allowed
            assert counting.calls == 3 and rl.redis_available
        finally:
            await rl.aclose()

    asyncio.run(run())


@pytest.mark.redis
def test_redis_down_falls_back_instead_of_failing_open() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def run() -> None:
        rl = RedisRateLimiter(f"redis://127.0.0.1:{port}/0", rate=0.1, burst=3.0, prefix="t:")
        try:
            decisions = [await rl.acquire("a") for _ in range(10)]
            assert [d.allowed for d in decisions] == [True] * 3 + [False] * 7
            assert decisions[-1].retry_after_s > 0
        finally:
            await rl.aclose()

    asyncio.run(run())


@pytest.mark.redis
def test_local_share_never_admits_more_than_the_shared_bucket() -> None:
    prefix = f"actprompt-test:{uuid.uuid4().hex}:"

    async def run() -> None:
        # a process may take rate x share (capped at burst / 4) ahead; so slow a rate that no refill counts
        kw = {"rate": 0.01, "burst": 100.0, "prefix": prefix, "local_share_s": 5000.0}
        a, b = RedisRateLimiter(REDIS_URL, **kw), RedisRateLimiter(REDIS_URL, **kw)  # type: ignore[arg-type]
        assert a.share == 25.0  # capped at burst / 4
        ca, cb = CountingScript(a._script), CountingScript(b._script)
        a._script, b._script = ca, cb  # type: ignore[assignment]
        try:
            first = []
            for _ in range(50):  # as many requests as the bucket holds
                first += [await a.acquire("t"), await b.acquire("t")]
            assert sum(d.allowed for d in first) >= 100 - 2 * 25  # refused early by at most P x share
            assert ca.calls + cb.calls <= 8  # most requests were decided without a round trip
            more = []
            for _ in range(100):
                more += [await a.acquire("t"), await b.acquire("t")]
            assert sum(d.allowed for d in first + more) <= 100  # never over the shared bucket
        finally:
            await a._redis.delete(prefix + "t")
            await a.aclose()
            await b.aclose()

    asyncio.run(run())
