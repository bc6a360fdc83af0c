"""Recovery with the shipped defaults, against real Redis, PostgreSQL and
`actprompt worker` processes. Unlike the other worker tests (seconds-long leases), these run with the
product's own lease, heartbeat, reaper and staleness settings, and print how long each recovery took.

* the broker is down when a job is submitted: the job is marked unsent and the reaper sends it at its next
  pass once the broker is back;
* a queued job's message is lost in Redis: the reaper re-sends it once its wait passes the staleness
  threshold and Redis holds no message for it; the job finishes;
* a worker is SIGKILLed mid-job: its lease runs out, the reaper re-queues the job, another worker resumes it
  from its checkpoint.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.workers.conftest import Deployment, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

#: The recovery settings under test: the product defaults, not the fast ones of the other worker tests.
RECOVERY_FIELDS = ("lease_seconds", "heartbeat_seconds", "reaper_interval_seconds", "queued_stale_seconds")
SLOW_LAYER = 3  # ResNet-20 "layer1.1": a few seconds per epoch on the shared CPU


def _use_default_recovery(dep: Deployment) -> None:
    for name in RECOVERY_FIELDS:
        dep.extra_env[f"ACTPROMPT_{name.upper()}"] = str(Settings.model_fields[name].default)


def _claims(dep: Deployment, job_id: str) -> list[Any]:
    """One state event per successful claim: the one that names the claiming worker."""
    return [e for e in dep.events(job_id) if e.type == "state" and "worker_id" in (e.data or {})]


def test_default_recovery_budget_fits_the_goals() -> None:
    """The arithmetic behind the defaults: a dead worker's job is re-queued within lease + one reaper pass,
    a lost message is re-sent within staleness + one pass, and a live job renews its lease 6 times per lease
    (so a false takeover needs 30 s without a single successful heartbeat)."""
    s = Settings()
    assert s.lease_seconds + s.reaper_interval_seconds <= 45  # + model load: resumed <= 60 s after a kill
    assert (
        s.queued_stale_seconds + s.reaper_interval_seconds <= 60
    )  # + a small job: done <= 3 min after a loss
    assert s.lease_seconds / s.heartbeat_seconds >= 6


def test_job_submitted_while_the_broker_is_down_is_sent_when_it_is_back(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    from service.domain.jobs import JobRequest, dispatch, submit_job
    from service.queue import CeleryQueue

    _use_default_recovery(deployment)
    deployment.start_worker()
    request = JobRequest(
        backbone=resnet20_backbone,
        dataset_uri=gtsrb_subset.as_uri(),
        hyperparameters={"epochs": 2, "batch_size": 64, "seed": 0, "val_fraction": 0.1},
    )
    down = CeleryQueue("redis://127.0.0.1:1/0", deployment.train_queue)  # nothing listens on port 1
    try:
        with deployment.session_factory() as session:  # what POST /v1/jobs does
            job, created = submit_job(
                session, tenant_id, request, idempotency_key=None, settings=deployment.settings()
            )
            assert created
            assert dispatch(session, down, job) is False
    finally:
        down.close()
    back = time.monotonic()  # the workers' broker is up: from the job's point of view it is back now
    assert deployment.job(job.id).enqueued_at is None  # marked unsent
    assert deployment.redis.llen(deployment.train_queue) == 0

    wait_for(
        lambda: deployment.job(job.id).status != "queued",
        120,
        "the job to start",
        on_timeout=deployment.diagnostics,
    )
    started_after = time.monotonic() - back
    done = deployment.wait_status(job.id, ("succeeded", "failed", "cancelled"), 120)
    assert done.status == "succeeded", (done.error, deployment.diagnostics())
    assert done.attempts == 1 and done.requeues == 1
    events = deployment.events(job.id)
    resent = [e for e in events if e.type == "log" and "sent to the broker again" in e.message]
    assert len(resent) == 1 and resent[0].id < _claims(deployment, job.id)[0].id
    print(f"\n[recovery] job submitted with the broker down started {started_after:.1f}s after it was back")


def test_queued_job_whose_message_was_lost_finishes(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    _use_default_recovery(deployment)
    deployment.start_worker()
    first = deployment.submit(tenant_id, resnet20_backbone, gtsrb_subset, hyperparameters={"epochs": 2})
    lost = deployment.submit(
        tenant_id, resnet20_backbone, gtsrb_subset, hyperparameters={"epochs": 2, "seed": 1}
    )
    wait_for(lambda: deployment.job(first).status == "running", 90, "the first job to start")
    assert deployment.redis.llen(deployment.train_queue) == 1
    deployment.redis.delete(deployment.train_queue)  # Redis loses the waiting message (this test's only)
    flushed = time.monotonic()

    job = deployment.wait_status(lost, ("succeeded", "failed", "cancelled"), 240)
    finished_after = time.monotonic() - flushed
    assert job.status == "succeeded", (job.error, deployment.diagnostics())
    assert job.attempts == 1 and job.requeues == 1  # re-sent once, trained once
    one = deployment.job(first)
    assert one.status == "succeeded" and one.requeues == 0 and len(_claims(deployment, first)) == 1
    print(f"\n[recovery] queued job whose message was lost finished {finished_after:.1f}s after the loss")


def test_sigkilled_worker_job_resumes_on_another_worker_with_the_default_lease(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    from service.domain.jobs import cancel_job

    _use_default_recovery(deployment)
    trainer = deployment.start_worker(beat=False)
    job_id = deployment.submit(
        tenant_id, resnet20_backbone, gtsrb_subset, prompt_layer=SLOW_LAYER, hyperparameters={"epochs": 40}
    )
    wait_for(lambda: deployment.job(job_id).status == "running", 90, "the job to start")
    spare = deployment.start_worker()  # idle, runs the reaper
    # Epoch 2's progress means epoch 1's checkpoint is stored (the checkpoint is written after its epoch's
    # progress, so waiting for epoch 1 alone races the kill against that write).
    wait_for(
        lambda: (deployment.job(job_id).progress or {}).get("epoch", 0) >= 2,
        120,
        "the first checkpoint",
        on_timeout=deployment.diagnostics,
    )
    trainer.kill(signal.SIGKILL)
    trainer.proc.wait(timeout=10)
    killed = time.monotonic()

    def resumed() -> bool:
        job = deployment.job(job_id)
        return job.status == "running" and job.attempts == 2

    # Guard only (the default budget is lease + reaper interval = 40 s; main's 120 + 30 s would miss it).
    wait_for(resumed, 90, "another worker to resume the job", on_timeout=deployment.diagnostics)
    resumed_after = time.monotonic() - killed
    job = deployment.job(job_id)
    assert job.worker_id.startswith(f"{spare.name}.")
    claims = _claims(deployment, job_id)
    assert [c.data["worker_id"].split(".")[0] for c in claims] == [trainer.name, spare.name]
    events = deployment.events(job_id)
    assert any("stopped renewing its lease" in e.message for e in events)
    wait_for(
        lambda: any(e.message.startswith("resuming from the checkpoint") for e in deployment.events(job_id)),
        60,
        "the resume event",
    )
    with deployment.session_factory() as session:  # end the test: the rest of the training proves nothing
        cancel_job(session, tenant_id, job_id)
        session.commit()
    assert deployment.wait_status(job_id, ("cancelled", "succeeded", "failed"), 60).status == "cancelled"
    print(f"\n[recovery] SIGKILLed worker's job resumed on {spare.name} {resumed_after:.1f}s after the kill")
