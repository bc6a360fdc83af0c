"""The gateway process's wiring of the domain to the serving layer (no FastAPI, no routes).

``predictor``: the domain's `Predictor` on the micro-batcher, with the database as the prompt source;
``ratelimit``: the per-tenant limiter the settings ask for. ``service.api`` builds both in its lifespan.
"""
