"""A running app keeps its start-up objects out of the collector's walk, and says how long collections
hold it (a full collection over an unfrozen heap stopped a loaded front's event loop for hundreds of ms)."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service.api.main import create_app
from tests.api.conftest import settings_for


def _pauses(generation: str) -> float:
    return REGISTRY.get_sample_value("actprompt_gc_pause_seconds_count", {"generation": generation}) or 0.0


def test_start_up_objects_are_frozen_while_the_app_runs_and_given_back_after(sqlite_url, tmp_path) -> None:
    gc.unfreeze()
    with TestClient(create_app(settings_for(sqlite_url, tmp_path, tmp_path))) as client:
        assert client.get("/healthz").status_code == 200
        frozen = gc.get_freeze_count()
        assert frozen > 50_000, f"only {frozen} objects frozen: torch, FastAPI and SQLAlchemy alone are more"
        before = _pauses("2")
        gc.collect(2)
        assert _pauses("2") == before + 1
        assert "actprompt_gc_pause_seconds" in client.get("/metrics").text
    assert gc.get_freeze_count() == 0, "an app that stopped left its objects frozen"
