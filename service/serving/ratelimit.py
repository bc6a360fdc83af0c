"""Per-tenant token buckets: Redis-backed (one Lua script, atomic across gateway processes) or in memory.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; a request costs one token
(the caller decides). A refused request learns how many seconds until it would be allowed, which the
gateway sends as ``Retry-After``.

The Redis limiter is built not to cost a predict its latency:

* **local share**: a call that finds tokens in Redis takes up to ``rate x local_share_s`` extra tokens into
  a process-local lease (kept at most ``lease_s``), so most requests of a busy tenant are decided without a
  round trip. Tokens are taken from the shared bucket *before* they are spent, so all processes together
  never admit more than one shared bucket would; the documented error is the other way: with P processes a
  tenant may be refused up to P x share tokens early, and leased tokens left unused expire after ``lease_s``.
  A share below 2 tokens is not worth a lease: every request asks Redis (exact).
* **short timeouts and a circuit breaker**: each Redis read is bounded by ``timeout_s`` (100 ms; a new
  connection gets at least 0.5 s); a failure opens the breaker for ``cooldown_s``, during which no request
  waits for Redis at all, then one request probes it again.
* **fallback**: while the breaker is open the process keeps limiting with its own in-memory buckets (the
  same rate and burst, per process), logs once per outage and counts the decisions in
  ``actprompt_rate_limit_fallback_total``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from service.serving import metrics
from service.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "InMemoryRateLimiter",
    "RateDecision",
    "RateLimiter",
    "RedisRateLimiter",
    "build_rate_limiter",
    "create_rate_limiter",
]


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


# KEYS[1] the bucket; ARGV rate, burst, cost, ttl_ms, share. Redis's own clock (TIME), so gateways on hosts
# whose clocks differ share one bucket correctly. An admitted call also takes up to ``share`` extra tokens
# (never more than are there) for the caller's local lease. Floats leave Lua as strings (Redis truncates).
_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local share = tonumber(ARGV[5])
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
local extra = 0
if tokens >= want then
  tokens = tokens - math.min(cost, tokens)
  extra = math.floor(math.min(share, tokens))
  tokens = tokens - extra
  allowed = 1
else
  retry = (want - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {allowed, tostring(retry), tostring(tokens), tostring(extra)}
"""


class RedisRateLimiter:
    """Production bucket: state in Redis, shared by every gateway process; see the module docstring."""

    def __init__(
        self,
        url_or_client: Any,
        rate: float,
        burst: float,
        *,
        prefix: str = "actprompt:rl:",
        timeout_s: float = 0.1,
        cooldown_s: float = 2.0,
        local_share_s: float = 0.05,
        lease_s: float = 1.0,
        clock: Any = time.monotonic,
    ) -> None:
        _check(rate, burst)
        from redis import asyncio as aioredis

        self.rate = rate
        self.burst = burst
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.lease_s = lease_s
        share = min(burst / 4, rate * local_share_s)
        self.share = float(math.floor(share)) if share >= 2 else 0.0
        self._clock = clock
        self._owns_client = isinstance(url_or_client, str)
        self._redis = (
            aioredis.from_url(
                url_or_client,
                socket_timeout=timeout_s,
                # a new connection needs a TCP handshake and a few commands: on a loaded host that is more
                # than one read's budget; a hung Redis still accepts connections, so reads time out anyway
                socket_connect_timeout=max(0.5, timeout_s),
                retry_on_timeout=False,
            )
            if isinstance(url_or_client, str)
            else url_or_client
        )
        self._script = self._redis.register_script(_LUA)
        # an idle bucket refills completely after burst/rate seconds; keep it a little longer, then let it go
        self._ttl_ms = math.ceil(burst / rate * 1000) + 1000
        self._leases: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, expires)
        self._open_until: float | None = None  # circuit breaker: None = closed (Redis answering)
        self.fallback = InMemoryRateLimiter(rate, burst, clock=clock)
        metrics.RATE_LIMIT_REDIS_UP.set(1)

    @property
    def redis_available(self) -> bool:
        return self._open_until is None

    async def acquire(self, tenant_id: str, cost: float = 1.0) -> RateDecision:
        now = self._clock()
        lease = self._leases.get(tenant_id)
        if lease is not None:
            tokens, expires = lease
            if expires > now and tokens >= cost:
                self._leases[tenant_id] = (tokens - cost, expires)
                return RateDecision(True, 0.0, tokens - cost)
            del self._leases[tenant_id]
        if self._open_until is not None and now < self._open_until:
            return await self._local(tenant_id, cost)
        try:
            allowed, retry, tokens, extra = await asyncio.wait_for(
                self._script(
                    keys=[self.prefix + tenant_id],
                    args=[self.rate, self.burst, cost, self._ttl_ms, self.share],
                ),
                max(0.5, self.timeout_s) + self.timeout_s,
            )
        except (RedisError, OSError, TimeoutError) as exc:  # down, hung or refusing: limit alone meanwhile
            if self._open_until is None:
                log.warning(
                    "rate limiter: Redis unavailable (%s: %s); limiting per process until it answers",
                    type(exc).__name__,
                    exc,
                )
                metrics.RATE_LIMIT_REDIS_OUTAGES.inc()
                metrics.RATE_LIMIT_REDIS_UP.set(0)
            self._open_until = self._clock() + self.cooldown_s
            return await self._local(tenant_id, cost)
        if self._open_until is not None:
            log.warning("rate limiter: Redis answers again; limits are shared across processes again")
            metrics.RATE_LIMIT_REDIS_UP.set(1)
            self._open_until = None
        if float(extra) > 0:
            self._leases[tenant_id] = (float(extra), now + self.lease_s)
        return RateDecision(bool(int(allowed)), float(retry), float(tokens))

    async def _local(self, tenant_id: str, cost: float) -> RateDecision:
        metrics.RATE_LIMIT_FALLBACK.inc()
        return await self.fallback.acquire(tenant_id, cost)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._redis.aclose()  # type: ignore[union-attr]  # stubs predate redis 5


def create_rate_limiter(
    rate: float, burst: float, *, redis_url: str | None = None, **redis_options: Any
) -> RateLimiter:
    """Redis-backed when a URL is given (production, shared by every gateway), else in memory (embedded)."""
    if redis_url:
        return RedisRateLimiter(redis_url, rate, burst, **redis_options)
    return InMemoryRateLimiter(rate, burst)


def build_rate_limiter(settings: Settings) -> RateLimiter | None:
    """The limiter the settings ask for: in Redis when one is configured (or is the broker), else in
    memory; None when limits are off. Each front process builds one in its lifespan."""
    if settings.rate_limit_per_second <= 0:
        return None
    url = settings.rate_limit_redis_url
    if url is None and settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")):
        url = settings.broker_url
    if url is None:
        return create_rate_limiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    return create_rate_limiter(
        settings.rate_limit_per_second,
        settings.rate_limit_burst,
        redis_url=url,
        timeout_s=settings.rate_limit_redis_timeout_ms / 1000,
        cooldown_s=settings.rate_limit_breaker_seconds,
        local_share_s=settings.rate_limit_local_share_s,
    )
