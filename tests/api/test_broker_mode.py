"""Production mode, gateway side: jobs go to Redis by task name; the broker's health is in /readyz."""

from __future__ import annotations

import json
import secrets

import pytest
import redis

from tests.api.conftest import Api, _truncate
from workers.queues import TRAIN_TASK

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture
def database_url(pg_database: str) -> str:
    """Production pairs the broker with PostgreSQL: only that backend here."""
    _truncate(pg_database)
    return pg_database


def test_jobs_are_sent_to_the_broker_by_task_name(make_api) -> None:
    queue_name = f"actprompt.test.{secrets.token_hex(4)}"
    api: Api = make_api(broker_url="redis://127.0.0.1:6379/0", job_queue=queue_name, auto_migrate=True)
    r = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        assert api.client.get("/readyz").json()["checks"] == {"database": "ok", "queue": "ok", "engine": "ok"}
        api.tiny_backbone()
        t = api.tenant()
        job = api.client.post("/v1/jobs", json=api.job_body(), headers=t).json()
        assert job["status"] == "validating"
        message = json.loads(r.lpop(queue_name) or b"{}")
        assert message["headers"]["task"] == TRAIN_TASK
        assert message["headers"]["argsrepr"] == f"['{job['id']}']"
        # sent exactly once, marked as sent, and claimed by nobody: the gateway only publishes
        assert r.llen(queue_name) == 0
        now = api.client.get(f"/v1/jobs/{job['id']}", headers=t).json()
        assert now["status"] == "validating" and now["enqueued_at"] is not None
        assert now["attempts"] == 0 and now["worker_id"] is None
    finally:
        r.delete(queue_name)
        r.close()


def test_broker_down_keeps_the_job_and_fails_readiness(make_api) -> None:
    api: Api = make_api(
        broker_url="redis://127.0.0.1:6399/0", job_queue="actprompt.nowhere", auto_migrate=True
    )
    ready = api.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["queue"] == "down"
    assert ready.json()["error"]["code"] == "not_ready"
    api.tiny_backbone()
    t = api.tenant()
    r = api.client.post("/v1/jobs", json=api.job_body(), headers=t)
    assert r.status_code == 202  # committed; the reaper re-sends it when the broker is back
    assert api.client.get(f"/v1/jobs/{r.json()['id']}", headers=t).json()["status"] == "validating"
