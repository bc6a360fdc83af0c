"""Real parts for the worker tests: a fresh PostgreSQL database, a Redis DB, and `actprompt worker` processes.

* PostgreSQL 127.0.0.1:5432 (trust auth, user postgres): one database with a random name per test session,
  migrated with the real Alembic scripts, dropped at the end.
* Redis 127.0.0.1:6379, DB `ACTPROMPT_TEST_REDIS_DB` (default 5); every test gets its own queue names, so a
  message left behind by a killed worker in one test never reaches another test's workers.
* Workers are real `actprompt worker` subprocesses in their own process group (killed as a group at the end
  of each test, whatever happened), with seconds-long leases so crash recovery is quick.
* Jobs are created through the real domain layer (`service.domain.jobs.create_job`) and sent through the
  gateway's `CeleryQueue`, exactly as `POST /v1/jobs` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from deploy.fleet import Proc
from tests.conftest import DATA_DIR, REPO_ROOT, WEIGHTS_DIR
from tests.services import require

PG_ADMIN_URL = os.environ.get("ACTPROMPT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_DB = int(os.environ.get("ACTPROMPT_TEST_REDIS_DB", "5"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
ACTPROMPT = str(Path(sys.executable).with_name("actprompt"))
RUN_ID = secrets.token_hex(3)

#: Short leases so that a killed worker's job is re-queued within seconds, and a fast reaper.
FAST_RECOVERY_ENV = {
    "ACTPROMPT_LEASE_SECONDS": "6",
    "ACTPROMPT_HEARTBEAT_SECONDS": "1",
    "ACTPROMPT_CANCEL_POLL_SECONDS": "0.2",
    "ACTPROMPT_REAPER_INTERVAL_SECONDS": "1",
    "ACTPROMPT_QUEUED_STALE_SECONDS": "6",
    "ACTPROMPT_PROGRESS_EVENT_SECONDS": "0.2",
    "ACTPROMPT_MAX_ATTEMPTS": "3",
}

TERMINAL = ("succeeded", "failed", "cancelled")


# --- PostgreSQL ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this session; dropped afterwards."""
    import psycopg

    from service.db.migrate import upgrade

    name = f"actprompt_workers_{RUN_ID}"
    require("postgres")  # a missing service is a failure, not a skip: CI starts it
    admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def session_factory(pg_url: str) -> Iterator[Any]:
    from service.db.session import make_engine, make_session_factory

    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()


# --- Redis -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    require("redis")
    return redis.Redis.from_url(REDIS_URL)


# --- data ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def gtsrb_subset(data_root: Path) -> Path:
    """A slice of the real GTSRB (10 classes): enough to show a prompt that predicts, fast on 2 cores."""
    with np.load(DATA_DIR / "gtsrb32.npz", allow_pickle=False) as z:
        x_train, y_train = z["x_train"], z["y_train"].astype(np.int64)
        x_test, y_test = z["x_test"], z["y_test"].astype(np.int64)
        classes = z["classes"]
    keep = 10
    rng = np.random.default_rng(0)

    def pick(x: np.ndarray, y: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(keep)])
        return x[idx], y[idx]

    xtr, ytr = pick(x_train, y_train, 30)
    xte, yte = pick(x_test, y_test, 20)
    path = data_root / "gtsrb10.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=classes[:keep])
    return path


@pytest.fixture(scope="session")
def resnet20_weights() -> str:
    path = WEIGHTS_DIR / "resnet20-12fca82f.th"
    assert path.is_file(), f"real weights expected at {path}"
    return path.as_uri()


# --- the deployment under test ---------------------------------------------------------------------
@dataclass
class WorkerProcess(Proc):
    """A worker of the deployment under test: a fleet process whose JSON log lines the tests read."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self, msg: str | None = None) -> list[dict[str, Any]]:
        """The worker's structured log lines (one JSON object each), optionally only those with `msg`."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if msg is None or record.get("msg") == msg:
                    out.append(record)
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the worker and anything it started)."""
        self.signal(sig)


@dataclass
class Deployment:
    """One isolated production-mode deployment: its own queues on the shared Redis DB, the session's DB."""

    pg_url: str
    data_root: Path
    tmp: Path
    session_factory: Any
    redis: redis.Redis
    tag: str
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def train_queue(self) -> str:
        return f"actprompt.test.{self.tag}.cpu"

    @property
    def maintenance_queue(self) -> str:
        return f"actprompt.test.{self.tag}.maintenance"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ACTPROMPT_DATABASE_URL": self.pg_url,
                "ACTPROMPT_BROKER_URL": REDIS_URL,
                "ACTPROMPT_JOB_QUEUE": self.train_queue,
                "ACTPROMPT_DEVICE": "cpu",
                "ACTPROMPT_DATA_ROOTS": str(self.data_root),
                "ACTPROMPT_VAR_DIR": str(self.tmp / "var"),
                "ACTPROMPT_LOG_JSON": "true",  # parsed by `WorkerProcess.records`
                "ACTPROMPT_LOG_LEVEL": "INFO",
                # Two shared cores: one intra-op thread per worker keeps two workers from thrashing.
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(FAST_RECOVERY_ENV)
        env.update(self.extra_env)
        return env

    def settings(self) -> Any:
        from service.settings import Settings

        env = self.env()
        fields = {
            key[len("ACTPROMPT_") :].lower(): value
            for key, value in env.items()
            if key.startswith("ACTPROMPT_") and key[len("ACTPROMPT_") :].lower() in Settings.model_fields
        }
        return Settings(**fields)

    def start_worker(self, *extra: str, beat: bool = True, wait: bool = True) -> WorkerProcess:
        name = f"w{len(self.workers)}"
        log_path = self.tmp / f"{name}.log"
        args = [ACTPROMPT, "worker", "--device", "cpu", "--maintenance-queue", self.maintenance_queue]
        args += ["--hostname", f"{name}.{self.tag}@test"]
        if beat:
            args.append("--beat")
        args += list(extra)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches everything it started
            )
        worker = WorkerProcess(name, proc, log_path)
        self.workers.append(worker)
        if wait:
            wait_for(lambda: "ready." in worker.log() or not worker.alive(), 90, f"{name} ready")
            assert worker.alive(), f"{name} exited early:\n{worker.log()[-4000:]}"
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill(signal.SIGKILL)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=10)

    # -- jobs through the real domain layer and the gateway's queue --------------------------------
    def submit(self, tenant_id: str, backbone_id: str, dataset: Path, *, send: bool = True, **kw: Any) -> str:
        from service.domain.jobs import JobRequest, create_job

        hyper = {"epochs": 3, "batch_size": 64, "learning_rate": 0.01, "seed": 0, "val_fraction": 0.1}
        hyper.update(kw.pop("hyperparameters", {}))
        request = JobRequest(
            backbone=backbone_id,
            dataset_uri=dataset.as_uri(),
            prompt_layer=kw.pop("prompt_layer", None),
            hyperparameters=hyper,
            **kw,
        )
        with self.session_factory() as session:
            job, created = create_job(
                session, tenant_id, request, idempotency_key=None, settings=self.settings()
            )
            session.commit()
            job_id = str(job.id)
        assert created
        if send:
            self.enqueue(job_id)
        return job_id

    def enqueue(self, job_id: str) -> None:
        from service.queue import CeleryQueue

        queue = CeleryQueue(REDIS_URL, self.train_queue)
        try:
            queue.enqueue(job_id)
        finally:
            queue.close()

    def job(self, job_id: str) -> Any:
        from service.db.models import Job

        with self.session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def events(self, job_id: str) -> list[Any]:
        from sqlalchemy import select

        from service.db.models import JobEvent

        with self.session_factory() as session:
            rows = list(
                session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            )
            for row in rows:
                session.expunge(row)
            return rows

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout: float) -> Any:
        def done() -> bool:
            return self.job(job_id).status in statuses

        wait_for(done, timeout, f"job {job_id} to reach {statuses}", on_timeout=self.diagnostics)
        return self.job(job_id)

    def diagnostics(self) -> str:
        parts = []
        for worker in self.workers:
            parts.append(f"--- {worker.name} (alive={worker.alive()}) ---\n{worker.log()[-3000:]}")
        return "\n".join(parts)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, *, on_timeout: Callable[[], str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    detail = on_timeout() if on_timeout else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")


@pytest.fixture(scope="session")
def tenant_id(session_factory: Any) -> str:
    from service.domain.tenants import create_tenant

    with session_factory() as session:
        tenant, _key = create_tenant(session, f"workers-{RUN_ID}")
        session.commit()
        return str(tenant.id)


@pytest.fixture(scope="session")
def resnet20_backbone(session_factory: Any, resnet20_weights: str) -> str:
    """The real CIFAR ResNet-20 (akamaster weights), registered through the domain layer."""
    from service.domain.backbones import register_backbone
    from service.engine import BackboneSpec

    with session_factory() as session:
        register_backbone(session, "resnet20", BackboneSpec("resnet20_cifar", weights=resnet20_weights))
        session.commit()
    return "resnet20"


@pytest.fixture
def deployment(
    request: pytest.FixtureRequest,
    pg_url: str,
    data_root: Path,
    tmp_path: Path,
    session_factory: Any,
    redis_client: redis.Redis,
) -> Iterator[Deployment]:
    tag = f"{RUN_ID}.{request.node.name.replace('[', '-').replace(']', '')}"
    dep = Deployment(pg_url, data_root, tmp_path, session_factory, redis_client, tag)
    try:
        yield dep
    finally:
        dep.stop_all()
        for key in redis_client.scan_iter(match=f"*actprompt.test.{tag}*"):
            redis_client.delete(key)
        # Messages a killed worker had reserved stay in kombu's `unacked` hash (until the visibility timeout);
        # drop this test's, so the shared Redis DB does not collect them.
        for delivery_tag, value in redis_client.hgetall("unacked").items():
            if f"actprompt.test.{tag}".encode() in value:
                redis_client.hdel("unacked", delivery_tag)
                redis_client.zrem("unacked_index", delivery_tag)
