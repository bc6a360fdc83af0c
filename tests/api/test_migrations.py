"""The schema comes from Alembic: an unmigrated database is refused; `actprompt db upgrade` fixes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from service.api.main import create_app
from service.db.migrate import DatabaseNotMigrated, head_revision
from service.db.session import make_engine
from tests.api.conftest import settings_for

ACTPROMPT = [str(Path(sys.executable).parent / "actprompt")]


def test_unmigrated_database_is_refused_then_upgraded(
    sqlite_url: str, data_root: Path, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_url, data_root, tmp_path, auto_migrate=False, broker_url=None)
    with pytest.raises(DatabaseNotMigrated, match="actprompt db upgrade"), TestClient(create_app(settings)):
        pass
    env = {**os.environ, "ACTPROMPT_DATABASE_URL": sqlite_url, "ACTPROMPT_AUTO_MIGRATE": "false"}
    refused = subprocess.run(
        [*ACTPROMPT, "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "actprompt db upgrade" in refused.stderr
    done = subprocess.run([*ACTPROMPT, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    engine = make_engine(sqlite_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"tenants", "api_keys", "backbones", "jobs", "job_events", "checkpoints", "prompts"} <= tables
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["checks"]["database"] == "ok"
    assert head_revision() is not None


def test_embedded_mode_migrates_itself(sqlite_url: str, data_root: Path, tmp_path: Path) -> None:
    settings = settings_for(sqlite_url, data_root, tmp_path, auto_migrate=None, admin_key=None)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        key = (tmp_path / "var" / "admin_key").read_text().strip()  # generated and stored
        assert (
            client.post(
                "/v1/tenants", json={"name": "x"}, headers={"Authorization": f"Bearer {key}"}
            ).status_code
            == 201
        )
