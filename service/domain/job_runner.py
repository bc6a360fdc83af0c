"""The one job runner: the embedded queue and the Celery task both call `run_job(job_id, ...)`.

Claim by a conditional UPDATE (a lease with owner and expiry) → `JobLease` (heartbeat, cancel, owned
writes) → validate the dataset (`validating` → `running`, or `failed` with the report) → the engine's one
training pipeline, its callbacks recorded by `JobRecorder` → the artifact stored as a prompt version.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from actprompt.states import JobStatus
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import detached_copy, utcnow
from service.db.models import Job
from service.db.repositories import (
    BackboneRepository,
    CheckpointRepository,
    JobEventRepository,
    JobLeaseRepository,
)
from service.domain.backbones import TRAINING_BACKBONES
from service.domain.datasets import resolve_dataset
from service.domain.job_lease import JobLease, LeaseStop
from service.domain.job_recorder import JobRecorder, jsonable
from service.domain.jobs import METHOD_OPTIONS_KEY
from service.domain.prompts import store_prompt
from service.settings import Settings
from service.storage import StorageUnavailable

log = logging.getLogger("actprompt.job_runner")


#: Hyperparameters that map 1:1 onto `TrainConfig` fields (the rest, `val_fraction`, shape the split).
_TRAIN_CONFIG_KEYS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "optimizer",
    "momentum",
    "warmup_epochs",
    "label_smoothing",
    "augment",
    "seed",
)
#: Storing the result retries this often when a concurrent retrain takes our prompt version number.
_STORE_ATTEMPTS = 5


class RunOutcome(enum.StrEnum):
    """What `run_job` did; a caller that re-enqueues on RETRY saves waiting for the reaper."""

    NOT_CLAIMED = "not_claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"  # back to `queued` after an unexpected error, attempts left
    INTERRUPTED = "interrupted"  # the process is stopping; back to `queued`
    LOST = "lost"  # the lease went to another worker; nothing written


def run_job(
    job_id: str,
    *,
    session_factory: sessionmaker[Session],
    worker_id: str,
    settings: Settings,
    stop_event: threading.Event | None = None,
) -> RunOutcome:
    """Claim and run one job to a final (or retry) state. Safe to call twice: one caller wins the lease."""
    now = utcnow()
    with session_factory() as session:
        lease = JobLeaseRepository(session)
        if not lease.claim(job_id, worker_id, now, now + timedelta(seconds=settings.lease_seconds)):
            _settle_unclaimable(session, job_id, now)
            session.commit()
            log.info("job not claimed", extra={"job_id": job_id, "worker_id": worker_id})
            return RunOutcome.NOT_CLAIMED
        job = lease.get(job_id)
        if job is None:  # deleted between the claim and the read
            session.rollback()
            return RunOutcome.NOT_CLAIMED
        JobEventRepository.add(
            session,
            job,
            "state",
            f"{job.status} on {worker_id} (attempt {job.attempts} of {job.max_attempts})",
            {"status": job.status, "worker_id": worker_id, "attempt": job.attempts},
        )
        session.commit()
        snapshot = detached_copy(job)
    log.info("job claimed", extra={"job_id": job_id, "worker_id": worker_id, "attempt": snapshot.attempts})
    TRAINING_BACKBONES.max_bytes = settings.training_backbones_bytes
    with JobLease(job_id, session_factory, worker_id, settings, stop_event) as held:
        return _JobRun(snapshot, held).execute()


def _settle_unclaimable(session: Session, job_id: str, now: datetime) -> None:
    """A delivery we could not claim: end jobs that can never be claimed again, leave live ones alone."""
    lease = JobLeaseRepository(session)
    job = lease.get(job_id)
    if job is None or job.lease_expires_at is None or job.lease_expires_at >= now:
        return
    if job.status in (JobStatus.VALIDATING, JobStatus.RUNNING) and job.attempts >= job.max_attempts:
        error = {
            "code": "worker_lost",
            "message": f"the worker stopped during attempt {job.attempts}; no attempts left",
        }
        if lease.update_if_status(
            job_id, (job.status,), status=JobStatus.FAILED, error=error, finished_at=now, updated_at=now
        ):
            JobEventRepository.add(
                session, job, "state", error["message"], {"status": JobStatus.FAILED}, level="error"
            )
    elif job.status == JobStatus.CANCELLING and lease.update_if_status(
        job_id, (JobStatus.CANCELLING,), status=JobStatus.CANCELLED, finished_at=now, updated_at=now
    ):
        JobEventRepository.add(
            session, job, "state", "cancelled (its worker was gone)", {"status": JobStatus.CANCELLED}
        )


class _JobRun:
    def __init__(self, job: Job, lease: JobLease) -> None:
        self.job = job
        self.lease = lease
        self.settings = lease.settings
        self.recorder = JobRecorder(
            lease, job.tenant_id, job.attempts, int(job.hyperparameters.get("epochs", 10))
        )
        self.validation_report: dict[str, Any] | None = None  # None until the dataset validated

    # --- main ---------------------------------------------------------------------------------------
    def execute(self) -> RunOutcome:
        from service.engine import EngineError, TrainingCancelled

        try:
            trained = self._train()
        except (TrainingCancelled, LeaseStop):
            return self._stopped()
        except EngineError as exc:
            if self.lease.should_stop():
                return self._stopped()
            return self._failed_by_engine(exc)
        except Exception as exc:
            return self._crashed(exc)
        try:
            return self._store(trained)
        except Exception as exc:  # the DB failed while storing: a retry resumes at the last checkpoint
            return self._crashed(exc)

    def _failed_by_engine(self, exc: Any) -> RunOutcome:
        code = str(getattr(exc, "code", "engine_error"))
        error = {"code": code, "message": str(exc) or code, "param": getattr(exc, "param", None)}
        extra: dict[str, Any] = {}
        if self.validation_report is None:  # the dataset did not validate: keep what was found
            details = getattr(exc, "details", None)
            extra["validation_report"] = jsonable(details) if details else {"errors": [error["message"]]}
        return self._finish(
            JobStatus.FAILED, RunOutcome.FAILED, error=error, message=f"failed: {error['message']}", **extra
        )

    def _crashed(self, exc: Exception) -> RunOutcome:
        if self.lease.should_stop():
            return self._stopped()
        log.exception("job crashed", extra={"job_id": self.job.id})
        error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        tb = traceback.format_exc(limit=8)
        if self.job.attempts >= self.job.max_attempts:
            return self._finish(
                JobStatus.FAILED,
                RunOutcome.FAILED,
                error=error,
                message=f"failed after {self.job.attempts} attempt(s): {error['message']}",
                data={"traceback": tb},
            )
        ok = self.lease.write(
            event=(
                "state",
                f"attempt {self.job.attempts} crashed ({error['message']}); queued for a retry",
                {"status": JobStatus.QUEUED, "traceback": tb},
            ),
            level="warning",
            status=JobStatus.QUEUED,
            error=error,
            lease_owner=None,
            lease_expires_at=None,
            enqueued_at=utcnow(),
        )
        return RunOutcome.RETRY if ok else RunOutcome.LOST

    def _stopped(self) -> RunOutcome:
        if self.lease.lost.is_set():
            log.warning("lease lost; leaving the job to its new owner", extra={"job_id": self.job.id})
            return RunOutcome.LOST
        if self.lease.cancel_requested.is_set():
            return self._finish(JobStatus.CANCELLED, RunOutcome.CANCELLED, message="cancelled")
        # Process shutdown: give the attempt back; the next start resumes the job from its checkpoint.
        status = (
            JobStatus.VALIDATING
            if self.validation_report is None and self.job.status == JobStatus.VALIDATING
            else JobStatus.QUEUED
        )
        ok = self.lease.write(
            event=("state", "interrupted by a worker shutdown; queued again", {"status": status}),
            status=status,
            lease_owner=None,
            lease_expires_at=None,
            attempts=max(0, self.job.attempts - 1),
            enqueued_at=utcnow(),
        )
        return RunOutcome.INTERRUPTED if ok else RunOutcome.LOST

    def _finish(
        self,
        status: str,
        outcome: RunOutcome,
        *,
        message: str,
        error: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        **values: Any,
    ) -> RunOutcome:
        level = "error" if status == JobStatus.FAILED else "info"
        ok = self.lease.write(
            event=(
                "state",
                message,
                {"status": status, **({"error": error} if error else {}), **(data or {})},
            ),
            level=level,
            status=status,
            error=error,
            finished_at=utcnow(),
            lease_expires_at=None,
            **values,
        )
        log.info("job finished", extra={"job_id": self.job.id, "status": status})
        return outcome if ok else RunOutcome.LOST

    # --- validation + training ----------------------------------------------------------------------
    def _dataset_path(self) -> Path:
        """The dataset as a local file. While the object store is down the job waits on its worker (lease
        renewed, cancel honoured) up to `storage_wait_seconds`; past that the attempt counts as crashed."""
        deadline = time.monotonic() + self.settings.storage_wait_seconds
        delay, told = 0.5, False
        while True:
            try:
                return resolve_dataset(
                    self.lease.session_factory, self.job.tenant_id, self.job.dataset_uri, self.settings
                )
            except StorageUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if not told:
                    told = True
                    log.warning("object store unavailable; waiting", extra={"job_id": self.job.id})
                    self.lease.event(
                        "log",
                        f"waiting for the object store: {exc.message}",
                        {"code": exc.code},
                        level="warning",
                    )
                self.lease.pause(min(delay, left))
                delay = min(delay * 2, 10.0)

    def _validate(self) -> Any:
        """Download, load, validate and split the dataset; `validating` → `running` with the report."""
        from service.engine import pipeline

        settings, hp = self.settings, self.job.hyperparameters
        path = self._dataset_path()
        self.lease.check_stop()
        split = pipeline.SplitSpec(
            val_fraction=float(hp.get("val_fraction", 0.1)), seed=int(hp.get("seed", 0))
        )
        dataset = pipeline.load_split(path, split, min_images_per_class=settings.min_images_per_class)
        report = jsonable(dataset.report.to_dict())
        event = (
            "validation",
            f"dataset: {report.get('num_classes')} classes, {report.get('num_train')} train / "
            f"{report.get('num_val')} val / {report.get('num_test')} test images",
            report,
        )
        if self.job.status == JobStatus.VALIDATING:
            moved = self.lease.write(
                event=event,
                only_if_status=(JobStatus.VALIDATING,),
                status=JobStatus.RUNNING,
                validation_report=report,
            )
            if not moved:  # cancelled meanwhile (or the lease is gone)
                if not self.lease.lost.is_set():
                    self.lease.cancel_requested.set()
                raise LeaseStop()
            self.lease.event("state", "validated; running", {"status": JobStatus.RUNNING})
        else:
            self.lease.write(event=event, validation_report=report)
        self.validation_report = report
        self.lease.check_stop()
        return dataset

    def _train(self) -> _Trained:
        from service.engine import BackboneError, pipeline
        from service.engine.method_search import AUTO
        from service.engine.search_checkpoint import describe as describe_search
        from service.engine.train import SEARCH, TrainConfig
        from service.engine.train import Checkpoint as EngineCheckpoint

        job, hp = self.job, self.job.hyperparameters
        dataset = self._validate()
        with self.lease.session_factory() as session:
            row = BackboneRepository(session).get(job.backbone_id)
            if row is None:
                raise BackboneError(f"backbone {job.backbone_id!r} was deleted")
            spec, spec_hash = dict(row.spec), row.spec_hash
            latest = CheckpointRepository.latest(session, job.id)
            resume = EngineCheckpoint.from_bytes(latest.data) if latest is not None else None
        backbone = TRAINING_BACKBONES.get(spec, spec_hash, self.settings.resolved_device())
        data = pipeline.preprocess_splits(dataset, backbone)
        self.lease.check_stop()
        if resume is not None:
            message = f"resuming from the checkpoint after epoch {resume.epoch}"
            if resume.kind == SEARCH:  # epochs counted across the candidates
                message += f" of the method search: {describe_search(resume)}"
            self.lease.event("log", message, {"epoch": resume.epoch, "kind": resume.kind})
        options = dict(hp.get(METHOD_OPTIONS_KEY) or {})
        if job.method == AUTO:
            self.lease.event("log", "searching the method (auto): each candidate trained, chosen on val")
        else:
            options["prompt_shape"] = job.prompt_shape
            if job.method == "activation" and job.resolved_layers is None:
                self.lease.event("log", "searching the prompt layer (auto)")
        trained = pipeline.train_prompt(
            backbone,
            data,
            job.method,
            prompt_layer=job.prompt_layer,
            layers=job.resolved_layers,  # resolved at submission (or by an earlier attempt's probe)
            method_options=options,
            config=TrainConfig(**{k: hp[k] for k in _TRAIN_CONFIG_KEYS if k in hp}),
            callbacks=self.recorder.callbacks(),
            resume=resume,
        )
        return _Trained(trained.result, trained.method, trained.layers, trained.train_config.epochs)

    # --- result -------------------------------------------------------------------------------------
    def _store(self, trained: _Trained) -> RunOutcome:
        """Store the artifact as a prompt version; a version conflict retries the insert, not the training."""
        artifact = trained.result.artifact
        data = artifact.to_bytes()
        metrics = jsonable(trained.result.metrics)
        for _ in range(_STORE_ATTEMPTS):  # a concurrent retrain of the same prompt may take our version
            with self.lease.session_factory() as session:
                try:
                    prompt = store_prompt(
                        session,
                        self.job.tenant_id,
                        artifact=data,
                        backbone_id=self.job.backbone_id,
                        method=trained.method,  # "auto" stores the method it chose
                        prompt_layers=trained.layers,
                        prompt_shape=self.job.prompt_shape if trained.layers else None,
                        classes=[str(c) for c in artifact.classes],
                        metrics=metrics,
                        name=self.job.name,
                        job_id=self.job.id,
                        prompt_id=self.job.target_prompt_id,
                    )
                except IntegrityError:
                    session.rollback()
                    continue
                return self._succeed(session, prompt, metrics, trained.epochs)
        error = {
            "code": "prompt_version_conflict",
            "message": f"could not allocate a version of prompt {self.job.target_prompt_id!r} after "
            f"{_STORE_ATTEMPTS} tries (concurrent retrains); submit the job again",
            "param": "prompt_id",
        }
        return self._finish(
            JobStatus.FAILED, RunOutcome.FAILED, error=error, message=f"failed: {error['message']}"
        )

    def _succeed(self, session: Session, prompt: Any, metrics: dict[str, Any], epochs: int) -> RunOutcome:
        now = utcnow()
        lease = JobLeaseRepository(session)
        if not lease.update_owned(
            self.job.id,
            self.lease.worker_id,
            status=JobStatus.SUCCEEDED,
            prompt_id=prompt.prompt_id,
            prompt_version=prompt.version,
            metrics=metrics,
            error=None,
            progress={"epoch": epochs, "epochs": epochs, "fraction": 1.0},
            finished_at=now,
            lease_expires_at=None,
            updated_at=now,
        ):
            session.rollback()
            self.lease.lost.set()
            return RunOutcome.LOST
        job = lease.get(self.job.id)
        if job is None:
            session.rollback()
            return RunOutcome.LOST
        ref = f"{prompt.prompt_id}@{prompt.version}"
        JobEventRepository.add(
            session,
            job,
            "state",
            f"succeeded: prompt {ref} ({prompt.size_bytes} bytes)",
            {"status": JobStatus.SUCCEEDED, "prompt": ref, "metrics": metrics},
        )
        session.commit()
        log.info("job succeeded", extra={"job_id": self.job.id, "prompt": ref})
        return RunOutcome.SUCCEEDED


@dataclass
class _Trained:
    result: Any  # engine TrainResult
    method: str
    layers: list[int]
    epochs: int
