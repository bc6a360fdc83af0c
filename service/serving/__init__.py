"""Multi-tenant prompt serving: the engine core and its process, and the fronts' side of the wire.

Imports the engine, asyncio and ZeroMQ only (no FastAPI, no database): callers hand in a
:class:`PromptSource` and internal keys. :class:`service.serving.core.EngineCore` holds the backbones, the
cache tiers, the batcher and admission control; :mod:`service.serving.engine_server` serves it to the
front processes, which reach it through :class:`service.serving.client.EngineClient`.

The package itself imports nothing, so that a front importing `service.serving.metrics` or
`service.serving.errors` does not load torch through the cache's artifact types.
"""
