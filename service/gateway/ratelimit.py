"""The per-tenant rate limiter the settings ask for (the gateway builds it once, in its lifespan)."""

from __future__ import annotations

from service.serving.ratelimit import RateLimiter, create_rate_limiter
from service.settings import Settings


def build_rate_limiter(settings: Settings) -> RateLimiter | None:
    """Per-tenant token buckets: in Redis when one is configured (or is the broker), else in memory."""
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
