"""Per-tenant token buckets: Redis-backed (one Lua script, atomic across gateway processes) or in memory.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; a request costs one token
per image (the caller decides). A refused request learns how many seconds until it would be allowed, which
the gateway sends as ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["InMemoryRateLimiter", "RateDecision", "RateLimiter", "RedisRateLimiter", "create_rate_limiter"]


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: float  # 0 when allowed; else seconds until ``cost`` tokens are back
    remaining: float  # tokens left after this decision

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, never 0 for a refusal (HTTP's Retry-After takes integers)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiter(Protocol):
    async def acquire(self, tenant_id: str, cost: float = 1.0) -> RateDecision: ...

    async def aclose(self) -> None: ...


def _check(rate: float, burst: float) -> None:
    if rate <= 0 or burst <= 0:
        raise ValueError("rate and burst must be positive")


class InMemoryRateLimiter:
    """The embedded-mode bucket: one process, so a dict and the event loop's single thread suffice."""

    def __init__(self, rate: float, burst: float, *, clock: Any = time.monotonic) -> None:
        _check(rate, burst)
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill time)

    async def acquire(self, tenant_id: str, cost: float = 1.0) -> RateDecision:
        now = self._clock()
        tokens, ts = self._buckets.get(tenant_id, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - ts) * self.rate)
        # same rule as the Lua script: a cost above the burst is let through on a full bucket (else never)
        want = min(cost, self.burst)
        if tokens >= want:
            tokens -= min(cost, tokens)
            decision = RateDecision(True, 0.0, tokens)
        else:
            decision = RateDecision(False, (want - tokens) / self.rate, tokens)
        self._buckets[tenant_id] = (tokens, now)
        return decision

    async def aclose(self) -> None:
        self._buckets.clear()


# KEYS[1] the bucket; ARGV rate, burst, cost, ttl_ms. Redis's own clock (TIME), so gateways on hosts whose
# clocks differ share one bucket correctly. Floats leave Lua as strings (Redis truncates Lua numbers).
_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local want = math.min(cost, burst)
local allowed = 0
local retry = 0
if tokens >= want then
  tokens = tokens - math.min(cost, tokens)
  allowed = 1
else
  retry = (want - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {allowed, tostring(retry), tostring(tokens)}
"""


class RedisRateLimiter:
    """Production bucket: state in Redis, updated by one Lua script so concurrent gateways cannot race."""

    def __init__(
        self, url_or_client: Any, rate: float, burst: float, *, prefix: str = "actprompt:rl:"
    ) -> None:
        _check(rate, burst)
        from redis import asyncio as aioredis

        self.rate = rate
        self.burst = burst
        self.prefix = prefix
        self._owns_client = isinstance(url_or_client, str)
        self._redis = aioredis.from_url(url_or_client) if isinstance(url_or_client, str) else url_or_client
        self._script = self._redis.register_script(_LUA)
        # an idle bucket refills completely after burst/rate seconds; keep it a little longer, then let it go
        self._ttl_ms = math.ceil(burst / rate * 1000) + 1000

    async def acquire(self, tenant_id: str, cost: float = 1.0) -> RateDecision:
        allowed, retry, tokens = await self._script(
            keys=[self.prefix + tenant_id], args=[self.rate, self.burst, cost, self._ttl_ms]
        )
        return RateDecision(bool(int(allowed)), float(retry), float(tokens))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._redis.aclose()  # type: ignore[union-attr]  # stubs predate redis 5


def create_rate_limiter(rate: float, burst: float, *, redis_url: str | None = None) -> RateLimiter:
    """Redis-backed when a URL is given (production, shared by every gateway), else in memory (embedded)."""
    if redis_url:
        return RedisRateLimiter(redis_url, rate, burst)
    return InMemoryRateLimiter(rate, burst)
