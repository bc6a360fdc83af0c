"""Celery task modules: thin; each takes an id (or nothing), re-reads the world, calls `service.domain`."""
