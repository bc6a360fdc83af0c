"""An embedded front that starts takes over the jobs of dead workers at once, never those of a live sibling.

`actprompt serve --workers N` runs one embedded worker per front; a front started or restarted while another
runs a job used to treat that job's lease as expired and queue it again, so it ran twice.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from service.db.base import utcnow
from service.db.models import Job
from service.queue import InProcessQueue, embedded_worker_id
from tests.api.conftest import Api


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


def test_takeover_at_start_spares_a_live_siblings_job(make_api: Callable[..., Api], live_pid: int) -> None:
    api = make_api(embedded_worker=False)
    t = api.tenant()
    api.tiny_backbone()
    ids = []
    for _ in range(3):
        r = api.client.post("/v1/jobs", json=api.job_body(), headers=t)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    owners = {
        ids[0]: embedded_worker_id(live_pid),  # a sibling front, running its job
        ids[1]: embedded_worker_id(_dead_pid()),  # a front that died mid-job
        ids[2]: "celery@elsewhere-7",  # not an embedded worker of this host: the takeover as before
    }
    factory = api.client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        for job_id, owner in owners.items():
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status="running", lease_owner=owner, attempts=1)
                .values(lease_expires_at=utcnow() + timedelta(seconds=30))
            )
        session.commit()

    InProcessQueue(factory, api.settings, run_jobs=False)._reap(takeover=True)  # what a starting front does

    jobs = {j: api.client.get(f"/v1/jobs/{j}", headers=t).json() for j in ids}
    assert jobs[ids[0]]["status"] == "running", "a live sibling's job was taken from it"
    assert [jobs[j]["status"] for j in ids[1:]] == ["queued", "queued"]
    with factory() as session:
        assert session.get(Job, ids[0]).lease_owner == owners[ids[0]]
