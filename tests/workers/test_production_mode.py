"""Production mode end to end: jobs through Redis to real `actprompt worker` processes, PostgreSQL the truth.

Each test is one fault scenario of the workers issue; the comments say what is killed or broken and when.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.services import forget_queues
from tests.workers.conftest import Deployment, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

#: ResNet-20's "layer1.1": a shallow prompt, so every epoch runs most of the network (a few seconds per
#: epoch on the shared CPU), which leaves time to kill or cancel a worker in the middle of training.
SLOW_LAYER = 3


def _state_events(dep: Deployment, job_id: str) -> list[Any]:
    return [e for e in dep.events(job_id) if e.type == "state"]


def _claims(dep: Deployment, job_id: str) -> list[Any]:
    """One `<status> on <worker>` state event per successful claim (= per attempt): the first claim of a
    new job finds it `validating`, a later one `running`; both name the worker."""
    return [e for e in _state_events(dep, job_id) if "worker_id" in (e.data or {})]


def test_job_through_redis_and_worker_succeeds_with_a_prompt_that_predicts(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    deployment.start_worker()
    job_id = deployment.submit(
        tenant_id, resnet20_backbone, gtsrb_subset, hyperparameters={"epochs": 6, "learning_rate": 0.02}
    )
    job = deployment.wait_status(job_id, ("succeeded", "failed", "cancelled"), 120)
    assert job.status == "succeeded", (job.error, deployment.diagnostics())
    assert job.attempts == 1 and job.worker_id and job.worker_id.startswith("w0.")
    assert job.prompt_id and job.validation_report["num_classes"] == 10
    assert len(_claims(deployment, job_id)) == 1

    # The stored artifact predicts the held-out test images far above chance (10 classes: 0.1).
    from service.db.models import Prompt
    from service.domain.backbones import BackboneCache
    from service.engine import BackboneSpec
    from service.engine.artifacts import PromptArtifact
    from service.engine.datasets.transforms import preprocess
    from service.engine.mixed_batch import predict_single

    with deployment.session_factory() as session:
        from sqlalchemy import select

        prompt = session.scalars(select(Prompt).where(Prompt.prompt_id == job.prompt_id)).one()
        artifact = PromptArtifact.from_bytes(prompt.artifact)
        from service.db.models import Backbone

        row = session.get(Backbone, resnet20_backbone)
        assert row is not None
        spec, spec_hash = dict(row.spec), row.spec_hash
    backbone = BackboneCache().get(spec, spec_hash, "cpu")
    assert isinstance(backbone.spec, BackboneSpec)
    with np.load(gtsrb_subset) as z:
        x = preprocess(z["x_test"], backbone.spec.input_size, backbone.spec.mean, backbone.spec.std)
        y = torch.as_tensor(z["y_test"].astype(np.int64))
    with torch.no_grad():
        accuracy = float((predict_single(backbone, artifact, x).argmax(1) == y).float().mean())
    assert accuracy > 0.3, accuracy
    assert abs(accuracy - job.metrics["test"]["top1"]) < 0.05


def test_worker_sigkilled_mid_training_job_resumes_from_checkpoint_on_a_new_worker(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    first = deployment.start_worker()
    job_id = deployment.submit(
        tenant_id,
        resnet20_backbone,
        gtsrb_subset,
        prompt_layer=SLOW_LAYER,
        hyperparameters={"epochs": 6},
    )
    # Kill when at least one epoch is checkpointed and training is still going.
    wait_for(
        lambda: (deployment.job(job_id).progress or {}).get("epoch", 0) >= 2,
        120,
        "the first checkpoint",
        on_timeout=deployment.diagnostics,
    )
    killed = deployment.job(job_id)
    assert killed.status == "running" and killed.attempts == 1
    first.kill(signal.SIGKILL)
    first.proc.wait(timeout=10)
    killed_at_epoch = int(killed.progress["epoch"])

    deployment.start_worker()  # a new worker: its beat runs the reaper once the dead lease expires
    job = deployment.wait_status(job_id, ("succeeded", "failed", "cancelled"), 150)
    assert job.status == "succeeded", (job.error, deployment.diagnostics())
    assert job.attempts == 2
    assert job.worker_id and job.worker_id.startswith("w1.")
    claims = _claims(deployment, job_id)
    assert [c.data["worker_id"].split(".")[0] for c in claims] == ["w0", "w1"]
    assert [c.data["attempt"] for c in claims] == [1, 2]
    events = deployment.events(job_id)
    resumed = [e for e in events if e.type == "log" and e.message.startswith("resuming from the checkpoint")]
    assert len(resumed) == 1 and resumed[0].data["epoch"] >= 1, [e.message for e in events]
    requeued = [e for e in events if e.type == "state" and "stopped renewing its lease" in e.message]
    assert len(requeued) == 1
    # The second attempt trained only the epochs after the checkpoint it resumed from.
    second_attempt_epochs = [e.data["epoch"] for e in events if e.type == "epoch" and e.id > resumed[0].id]
    assert second_attempt_epochs == list(range(resumed[0].data["epoch"] + 1, 7))
    assert resumed[0].data["epoch"] <= killed_at_epoch + 1
    print(
        f"\n[fault] SIGKILL worker w0 at epoch {killed_at_epoch}/6 of {job_id}; "
        f"w1 resumed after epoch {resumed[0].data['epoch']}; final {job.status}, attempts {job.attempts}"
    )


def test_broker_flushed_while_jobs_are_queued_every_job_still_succeeds(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    deployment.start_worker()
    job_ids = [
        deployment.submit(
            tenant_id, resnet20_backbone, gtsrb_subset, hyperparameters={"epochs": 2, "seed": i}
        )
        for i in range(3)
    ]
    # The worker runs the first job; the other two wait in Redis. Then Redis loses everything.
    wait_for(lambda: deployment.job(job_ids[0]).status == "running", 60, "the first job to start")
    assert deployment.redis.llen(deployment.train_queue) == 2
    # Redis loses this deployment's messages and bindings (scoped: other test runs share the DB)
    assert forget_queues(deployment.redis, deployment.train_queue, deployment.maintenance_queue) > 0
    assert deployment.redis.llen(deployment.train_queue) == 0
    flushed_at = time.monotonic()

    for job_id in job_ids:
        job = deployment.wait_status(job_id, ("succeeded", "failed", "cancelled"), 150)
        assert job.status == "succeeded", (job.error, deployment.diagnostics())
        assert job.attempts == 1
    first, *rest = (deployment.job(job_id) for job_id in job_ids)
    assert first.requeues == 0  # it was running: the flush did not touch it
    # The queued ones were re-sent by the reaper (their messages were gone), once each: after the re-send
    # their messages were in the broker again, so the reaper left them alone.
    assert all(1 <= job.requeues <= 2 for job in rest), [job.requeues for job in rest]
    print(
        f"\n[fault] FLUSHDB while {job_ids[0]} ran and 2 jobs were queued; all 3 succeeded "
        f"{time.monotonic() - flushed_at:.0f}s later (attempts 1 each; the queued ones re-sent once)"
    )


def test_same_job_delivered_twice_at_once_trains_once(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    a = deployment.start_worker(wait=False)
    b = deployment.start_worker(beat=False, wait=False)
    for w in (a, b):
        wait_for(lambda w=w: "ready." in w.log() or not w.alive(), 90, f"{w.name} ready")
        assert w.alive(), w.log()
    job_id = deployment.submit(
        tenant_id, resnet20_backbone, gtsrb_subset, send=False, hyperparameters={"epochs": 3}
    )
    deployment.enqueue(job_id)
    deployment.enqueue(job_id)  # the same job, twice: both idle workers take one message each
    job = deployment.wait_status(job_id, ("succeeded", "failed", "cancelled"), 120)
    assert job.status == "succeeded", (job.error, deployment.diagnostics())
    wait_for(
        lambda: sum(len(w.records("train task done")) for w in (a, b)) == 2, 30, "both deliveries handled"
    )
    assert job.attempts == 1
    assert len(_claims(deployment, job_id)) == 1
    epochs = [e.data["epoch"] for e in deployment.events(job_id) if e.type == "epoch"]
    assert epochs == [1, 2, 3]
    outcomes = sorted(r["outcome"] for w in (a, b) for r in w.records("train task done"))
    assert outcomes == ["not_claimed", "succeeded"], outcomes
    from service.db.models import Prompt

    with deployment.session_factory() as session:
        from sqlalchemy import func, select

        assert session.scalar(select(func.count()).select_from(Prompt).where(Prompt.job_id == job_id)) == 1


def test_cancel_running_job_ends_cancelled_quickly_and_worker_takes_the_next(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    from service.domain.jobs import cancel_job

    deployment.start_worker()
    long_job = deployment.submit(
        tenant_id, resnet20_backbone, gtsrb_subset, prompt_layer=SLOW_LAYER, hyperparameters={"epochs": 50}
    )
    next_job = deployment.submit(tenant_id, resnet20_backbone, gtsrb_subset, hyperparameters={"epochs": 2})
    wait_for(
        lambda: (
            (deployment.job(long_job).progress or {}).get("epoch", 0) >= 1
            and deployment.job(long_job).status == "running"
        ),
        120,
        "the long job to train",
        on_timeout=deployment.diagnostics,
    )
    with deployment.session_factory() as session:  # what POST /v1/jobs/{id}/cancel does
        assert cancel_job(session, tenant_id, long_job).status == "cancelling"
        session.commit()
    job = deployment.wait_status(long_job, ("cancelled", "succeeded", "failed"), 120)
    assert job.status == "cancelled", job.status  # state, not seconds: 50 epochs would have succeeded
    assert int(job.progress["epoch"]) < 50 and job.prompt_id is None

    nxt = deployment.wait_status(next_job, ("succeeded", "failed", "cancelled"), 90)
    assert nxt.status == "succeeded", (nxt.error, deployment.diagnostics())
    assert nxt.worker_id == job.worker_id  # the same (only) worker went on to the next job
    print(
        f"\n[fault] cancelled {long_job} at epoch {job.progress['epoch']}/50; "
        "the next job succeeded on the same worker"
    )


def test_sigterm_hands_the_running_job_to_another_worker_at_once(
    deployment: Deployment, tenant_id: str, resnet20_backbone: str, gtsrb_subset: Path
) -> None:
    """`docker stop`: a warm shutdown gives the attempt back and re-sends the job (no lease wait)."""
    workers = [deployment.start_worker(wait=False), deployment.start_worker(beat=False, wait=False)]
    for w in workers:
        wait_for(lambda w=w: "ready." in w.log() or not w.alive(), 90, f"{w.name} ready")
        assert w.alive(), w.log()
    job_id = deployment.submit(
        tenant_id, resnet20_backbone, gtsrb_subset, prompt_layer=SLOW_LAYER, hyperparameters={"epochs": 3}
    )
    wait_for(
        lambda: (deployment.job(job_id).progress or {}).get("epoch", 0) >= 2,
        120,
        "the first checkpoint",
        on_timeout=deployment.diagnostics,
    )
    owner_id = deployment.job(job_id).worker_id
    owner = next(w for w in workers if owner_id.startswith(f"{w.name}."))
    other = next(w for w in workers if w is not owner)
    owner.proc.send_signal(signal.SIGTERM)
    assert owner.proc.wait(timeout=30) == 0  # a clean exit, after handing the job back
    job = deployment.wait_status(job_id, ("succeeded", "failed", "cancelled"), 120)
    assert job.status == "succeeded", (job.error, deployment.diagnostics())
    assert job.worker_id.startswith(f"{other.name}.")
    assert job.attempts == 1  # the interrupted attempt was given back, not counted as a crash
    events = deployment.events(job_id)
    assert any(e.type == "state" and e.message.startswith("interrupted by a worker shutdown") for e in events)
    resumed = [e for e in events if e.type == "log" and e.message.startswith("resuming from the checkpoint")]
    assert len(resumed) == 1 and resumed[0].data["epoch"] >= 1
    assert not any("stopped renewing its lease" in e.message for e in events)  # no lease expiry involved
    print(
        f"\n[fault] SIGTERM {owner.name} during epoch 2/3 of {job_id}; {other.name} resumed after epoch "
        f"{resumed[0].data['epoch']}; final {job.status}, attempts {job.attempts}"
    )
