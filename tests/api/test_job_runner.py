"""The job runner and the reaper against a real database: leases, double delivery, retries, resume."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from service.db.base import utcnow
from service.db.models import Checkpoint, Job, JobEvent
from service.db.repositories import JobLeaseRepository
from service.db.session import make_engine, make_session_factory
from service.domain.job_runner import RunOutcome, run_job
from service.domain.reaper import reap
from tests.api.conftest import Api


class ListQueue:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def enqueue(self, job_id: str) -> None:
        self.sent.append(job_id)

    def ping(self) -> bool:
        return True


@pytest.fixture
def setup(make_api):
    api: Api = make_api(embedded_worker=False, max_attempts=2, max_requeues=1)
    api.tiny_backbone()
    tenant = api.tenant()
    engine = make_engine(api.settings.database_url)
    factory = make_session_factory(engine)

    def submit(**overrides) -> str:
        r = api.client.post("/v1/jobs", json=api.job_body(**overrides), headers=tenant)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(job_id: str) -> Job:
        with factory() as s:
            row = s.get(Job, job_id)
            assert row is not None
            return row

    yield api, factory, submit, job
    engine.dispose()


def test_second_delivery_while_leased_does_nothing(setup) -> None:
    api, factory, submit, job = setup
    job_id = submit()
    now = utcnow()
    with factory() as s:
        assert JobLeaseRepository(s).claim(job_id, "worker-a", now, now + timedelta(seconds=60))
        s.commit()
    out = run_job(job_id, session_factory=factory, worker_id="worker-b", settings=api.settings)
    assert out == RunOutcome.NOT_CLAIMED
    row = job(job_id)
    assert (row.status, row.lease_owner, row.attempts) == ("validating", "worker-a", 1)
    with factory() as s:  # the same worker cannot claim twice either
        assert not JobLeaseRepository(s).claim(job_id, "worker-a", now, now + timedelta(seconds=60))


def test_concurrent_deliveries_train_once(setup) -> None:
    api, factory, submit, job = setup
    job_id = submit()
    outcomes: list[RunOutcome] = []
    threads = [
        threading.Thread(
            target=lambda w=w: outcomes.append(
                run_job(job_id, session_factory=factory, worker_id=f"w{w}", settings=api.settings)
            )
        )
        for w in range(2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert sorted(o.value for o in outcomes) == ["not_claimed", "succeeded"]
    row = job(job_id)
    assert row.status == "succeeded" and row.attempts == 1 and row.prompt_version == 1


def test_reaper_requeues_expired_leases_and_resends_lost_messages(setup) -> None:
    api, factory, submit, job = setup
    lost, stale = submit(), submit()

    def lose(worker: str) -> None:
        """`lost`: claimed by `worker`, whose lease ran out; `stale`: queued, its message never delivered."""
        now = utcnow()
        with factory() as s:
            assert JobLeaseRepository(s).claim(
                lost, worker, now - timedelta(seconds=120), now - timedelta(seconds=1)
            )
            s.get(Job, stale).enqueued_at = now - timedelta(seconds=api.settings.queued_stale_seconds + 5)  # type: ignore[union-attr]
            s.commit()

    lose("dead-worker")
    queue = ListQueue()
    report = reap(factory, queue, api.settings)
    assert (
        report.requeued == [lost] and report.resent == [stale] and sorted(queue.sent) == sorted([lost, stale])
    )
    row = job(lost)
    # it died while validating: validated again by the next claimer
    assert (row.status, row.lease_owner, row.attempts) == ("validating", None, 1)
    assert job(stale).requeues == 1
    assert reap(factory, ListQueue(), api.settings).requeued == []  # nothing more to do

    # second loss: attempts exhausted (max_attempts=2) -> failed with the reason
    lose("dead-again")
    report = reap(factory, ListQueue(), api.settings)
    assert sorted(report.failed) == sorted([lost, stale])
    assert job(lost).status == "failed" and job(lost).error["code"] == "worker_lost"  # type: ignore[index]
    assert job(stale).error["code"] == "not_picked_up"  # type: ignore[index]
    # a late delivery of a failed job does nothing
    assert (
        run_job(lost, session_factory=factory, worker_id="w", settings=api.settings) == RunOutcome.NOT_CLAIMED
    )


def test_interrupted_job_resumes_from_checkpoint(setup) -> None:
    api, factory, submit, job = setup
    job_id = submit(hyperparameters={"epochs": 12, "batch_size": 4})
    stop = threading.Event()
    result: list[RunOutcome] = []
    th = threading.Thread(
        target=lambda: result.append(
            run_job(job_id, session_factory=factory, worker_id="w1", settings=api.settings, stop_event=stop)
        )
    )
    th.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with factory() as s:
            if s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id)):
                break
        time.sleep(0.05)
    stop.set()
    th.join(60)
    assert result == [RunOutcome.INTERRUPTED]
    row = job(job_id)
    assert row.status == "queued" and row.lease_owner is None
    out = run_job(job_id, session_factory=factory, worker_id="w2", settings=api.settings)
    assert out == RunOutcome.SUCCEEDED
    with factory() as s:
        messages = list(s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)))
    resumed = [m for m in messages if m.startswith("resuming from the checkpoint after epoch")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 1
    assert job(job_id).worker_id == "w2"


def test_crash_retries_then_fails(setup, monkeypatch) -> None:
    api, factory, submit, job = setup
    import service.engine.train

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(service.engine.train, "fit", boom)
    job_id = submit()
    assert run_job(job_id, session_factory=factory, worker_id="w", settings=api.settings) == RunOutcome.RETRY
    row = job(job_id)
    assert row.status == "queued" and row.attempts == 1 and "simulated crash" in row.error["message"]  # type: ignore[index]
    assert run_job(job_id, session_factory=factory, worker_id="w", settings=api.settings) == RunOutcome.FAILED
    row = job(job_id)
    assert row.status == "failed" and row.attempts == 2 and row.error["code"] == "internal_error"  # type: ignore[index]


def test_bad_dataset_fails_with_engine_code(setup) -> None:
    api, factory, submit, job = setup
    bad = Path(api.settings.data_roots) / "one_class.npz"
    np.savez(bad, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.zeros(4, np.int64))
    job_id = submit(dataset_uri=bad.as_uri())
    assert run_job(job_id, session_factory=factory, worker_id="w", settings=api.settings) == RunOutcome.FAILED
    row = job(job_id)
    assert row.status == "failed" and row.attempts == 1 and row.error["code"] == "invalid_dataset"  # type: ignore[index]
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.tenant("x"))
    assert r.status_code == 404


def test_validation_failure_ends_the_job_with_its_report(setup) -> None:
    api, factory, submit, job = setup
    root = Path(api.settings.data_roots)
    x = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    np.savez(
        root / "small_class.npz",
        x_train=x,
        y_train=np.array([0, 0, 1, 1, 2]),
        classes=np.array(["a", "b", "c"]),
    )
    job_id = submit(dataset_uri=(root / "small_class.npz").as_uri())
    assert job(job_id).status == "validating"  # POST answered at once; nothing was loaded yet
    assert run_job(job_id, session_factory=factory, worker_id="w", settings=api.settings) == RunOutcome.FAILED
    row = job(job_id)
    assert row.status == "failed" and row.error["code"] == "invalid_dataset"  # type: ignore[index]
    report = row.validation_report
    assert report is not None and report["classes_below_minimum"] == ["c"]
    assert report["images_per_class"] == {"a": 2, "b": 2, "c": 1}


def test_a_claimed_validating_job_is_cancelled_by_its_runner_not_under_it(setup) -> None:
    """Unclaimed: cancelled at once. Claimed while validating: `cancelling` (the runner cannot move it on)."""
    api, factory, submit, job = setup
    job_id = submit()
    now = utcnow()
    with factory() as s:  # a worker claimed it and is still validating
        assert JobLeaseRepository(s).claim(job_id, "worker-a", now, now + timedelta(seconds=60))
        s.commit()
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.tenant("other-cancel"))
    assert r.status_code == 404  # another tenant cannot see it
    with factory() as s:
        from service.domain.jobs import cancel_job

        assert cancel_job(s, job(job_id).tenant_id, job_id).status == "cancelling"
        s.commit()
        assert not JobLeaseRepository(s).update_owned(
            job_id, "worker-a", statuses=("validating",), status="running"
        )  # the runner's validating -> running step finds the cancel
    unclaimed = submit()
    with factory() as s:
        assert cancel_job(s, job(unclaimed).tenant_id, unclaimed).status == "cancelled"
        s.commit()


def test_a_prompt_version_conflict_fails_without_training_again(setup, monkeypatch) -> None:
    api, factory, submit, job = setup
    from sqlalchemy.exc import IntegrityError

    import service.domain.job_runner as runner
    import service.engine.train

    fits: list[int] = []
    real_fit = service.engine.train.fit

    def counting_fit(*args, **kwargs):
        fits.append(1)
        return real_fit(*args, **kwargs)

    def always_taken(*args, **kwargs):
        raise IntegrityError("INSERT INTO prompts", {}, Exception("uq_prompts_version"))

    monkeypatch.setattr(service.engine.train, "fit", counting_fit)
    monkeypatch.setattr(runner, "store_prompt", always_taken)
    job_id = submit()
    assert run_job(job_id, session_factory=factory, worker_id="w", settings=api.settings) == RunOutcome.FAILED
    row = job(job_id)
    assert row.status == "failed" and row.error["code"] == "prompt_version_conflict"  # type: ignore[index]
    assert fits == [1] and row.attempts == 1  # trained once, not re-queued to train again


def test_an_auto_job_resumes_its_search_without_training_a_finished_candidate_again(
    setup, monkeypatch
) -> None:
    """Attempt 1 dies as the second candidate starts; attempt 2 resumes from the search's checkpoint."""
    api, factory, submit, job = setup
    import service.engine.train

    fits: list[str] = []
    real_fit = service.engine.train.fit
    alive = [False]  # attempt 1's worker dies on its second fit

    def fit(backbone, method, *args, **kwargs):
        fits.append(method)
        if len(fits) == 2 and not alive[0]:
            raise RuntimeError("the worker died")
        return real_fit(backbone, method, *args, **kwargs)

    monkeypatch.setattr(service.engine.train, "fit", fit)
    job_id = submit(method="auto", hyperparameters={"epochs": 2, "batch_size": 8})
    assert run_job(job_id, session_factory=factory, worker_id="w1", settings=api.settings) == RunOutcome.RETRY
    assert fits == ["activation", "deep_activation_norm"]
    with factory() as s:
        stored = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
    assert 0 < len(stored) <= api.settings.checkpoints_keep
    alive[0] = True
    fits.clear()
    assert (
        run_job(job_id, session_factory=factory, worker_id="w2", settings=api.settings)
        == RunOutcome.SUCCEEDED
    )
    assert fits == ["deep_activation_norm", "lora"]  # not the activation candidate: it had finished
    row = job(job_id)
    assert row.status == "succeeded" and row.attempts == 2
    with factory() as s:
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
    reported = [e.data for e in events if e.type == "method_search"]
    table = row.metrics["auto"]["candidates"]  # type: ignore[index]
    assert [r["method"] for r in reported] == [r["method"] for r in table]  # each reported once
    # the finished candidate's row as attempt 1 reported it, its training seconds included
    assert {k: v for k, v in table[0].items() if k != "chosen"} == reported[0]
    resumed = [e.message for e in events if e.message.startswith("resuming from the checkpoint")]
    assert resumed == [
        "resuming from the checkpoint after epoch 2 of the method search: "
        "1 candidate(s) finished (activation)"
    ]
    with factory() as s:
        kept = list(s.scalars(select(Checkpoint.epoch).where(Checkpoint.job_id == job_id)))
    assert len(kept) <= api.settings.checkpoints_keep and max(kept) == 3 * 2  # epochs across the candidates
