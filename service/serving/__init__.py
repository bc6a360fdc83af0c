"""Multi-tenant prompt serving: a tiered prompt cache, a slot table, and a cross-request micro-batcher.

Imports the engine and asyncio only (no FastAPI, no database): the gateway hands in a
:class:`PromptSource` and internal keys. The facade the API calls is
:class:`service.serving.predictor.ServingPredictor`.
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
