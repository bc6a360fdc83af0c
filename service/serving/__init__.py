"""Multi-tenant prompt serving: the engine core and its process, and the fronts' side of the wire.

Imports the engine, asyncio and ZeroMQ only (no FastAPI, no database): callers hand in a
:class:`PromptSource` and internal keys. :class:`service.serving.core.EngineCore` holds the backbones, the
cache tiers, the batcher and admission control; :mod:`service.serving.engine_server` serves it to the
front processes, which reach it through :class:`service.serving.client.EngineClient`.
"""

from service.serving.cache import CallableSource, LoadedPrompt, PromptCache, PromptSource
from service.serving.errors import PinLimitError, PromptNotFoundError, ServingClosedError, ServingError
from service.serving.ratelimit import InMemoryRateLimiter, RateDecision, RateLimiter, RedisRateLimiter
from service.serving.slots import SlotPolicy

__all__ = [
    "CallableSource",
    "InMemoryRateLimiter",
    "LoadedPrompt",
    "PinLimitError",
    "PromptCache",
    "PromptNotFoundError",
    "PromptSource",
    "RateDecision",
    "RateLimiter",
    "RedisRateLimiter",
    "ServingClosedError",
    "ServingError",
    "SlotPolicy",
]
