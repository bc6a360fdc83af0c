"""Dataset loaders, one module per source format; the public entry point is ``service.engine.data``."""
