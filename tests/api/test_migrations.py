"""The schema comes from Alembic: an unmigrated database is refused; `actprompt db upgrade` fixes it."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from service.api.main import create_app
from service.db.migrate import DatabaseNotMigrated, check_migrated, head_revision
from service.db.session import make_engine
from tests.api.conftest import fresh_pg_database, settings_for

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


def _upgrade_at_barrier(url: str, barrier: Any, results: Any) -> None:
    """One process of the race: imports done, wait for the others, then upgrade together."""
    from service.db.migrate import upgrade as _upgrade

    barrier.wait(timeout=120)
    try:
        _upgrade(url)
        results.put("ok")
    except Exception as exc:  # the report is the assertion's message
        results.put(repr(exc)[:300])


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_upgrades_of_a_fresh_database_all_succeed(kind: str, tmp_path: Path) -> None:
    """`serve --workers N` (each process migrates at start), several replicas, or a replica and
    `actprompt db upgrade` racing on one fresh database: every one succeeds and the schema is at head.
    Without the migration lock the losers failed with "table ... already exists" (SQLite) or a
    duplicate `pg_type` key (PostgreSQL) on nearly every try, and a failed start-up stops uvicorn's
    supervisor."""
    ctx = mp.get_context("spawn")
    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path / 'fresh.db'}"
            if kind == "sqlite"
            else stack.enter_context(fresh_pg_database("actprompt_race"))
        )
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_upgrade_at_barrier, args=(url, barrier, results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["ok"] * 3, outcomes
        engine = make_engine(url)
        try:
            check_migrated(engine)
        finally:
            engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_keys_that_predate_scopes_keep_every_scope(kind: str, tmp_path: Path) -> None:
    """A database at 0002 with a tenant and a key, upgraded to head: the key holds all four scopes, and
    the model's schema (autogenerate's comparison) has nothing left to migrate."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from service.db.base import Base
    from service.db.migrate import upgrade
    from service.domain.tenants import ALL_SCOPES, authenticate, hash_key

    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path / 'old.db'}"
            if kind == "sqlite"
            else stack.enter_context(fresh_pg_database())
        )
        upgrade(url, "0002")
        engine = make_engine(url)
        stack.callback(engine.dispose)
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_old', 'old', :t)"),
                {"t": "2026-01-01"},
            )
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, tenant_id, prefix, key_hash, name, created_at) "
                    "VALUES ('key_old', 'ten_old', 'ap_old', :h, 'old', :t)"
                ),
                {"h": hash_key("ap_old-secret"), "t": "2026-01-01"},
            )
        upgrade(url)
        with Session(engine) as session:
            principal = authenticate(session, "ap_old-secret", admin_key=None)
        assert principal.tenant_id == "ten_old" and principal.scopes == ALL_SCOPES
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
