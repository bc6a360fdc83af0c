"""The one job runner: the embedded queue and the Celery task both call `run_job(job_id, ...)`.

Claim by a conditional UPDATE (a lease with owner and expiry) → heartbeat thread (renews the lease, notices
a cancel request) → dataset → backbone → `fit` with callbacks (progress, epoch metrics, checkpoints,
should_stop) → artifact stored as a prompt version. Every write after the claim is conditioned on still
owning the lease, so a worker that lost its job (its lease expired and someone else took it) cannot
overwrite the new owner's state.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.db.models import Checkpoint, Job
from service.db.repositories import (
    BackboneRepository,
    CheckpointRepository,
    JobEventRepository,
    JobLeaseRepository,
)
from service.domain.backbones import BackboneCache
from service.domain.prompts import store_prompt
from service.settings import Settings

log = logging.getLogger("actprompt.job_runner")

#: Backbones loaded by this process for training (separate from the serving copies).
TRAINING_BACKBONES = BackboneCache()

#: Hyperparameters that map 1:1 onto `TrainConfig` fields.
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


class RunOutcome(enum.StrEnum):
    """What `run_job` did; a caller that re-enqueues on RETRY saves waiting for the reaper."""

    NOT_CLAIMED = "not_claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"  # back to `queued` after an unexpected error, attempts left
    INTERRUPTED = "interrupted"  # the process is stopping; back to `queued`
    LOST = "lost"  # the lease went to another worker; nothing written


class _Stop(Exception):
    """Internal: stop before `fit` started (cancel / lost lease / shutdown noticed early)."""


@dataclass(frozen=True)
class _JobSnapshot:
    id: str
    tenant_id: str
    backbone_id: str
    dataset_uri: str
    method: str
    prompt_layer: Any
    resolved_layers: list[int] | None
    prompt_shape: str
    hyperparameters: dict[str, Any]
    name: str | None
    target_prompt_id: str | None
    attempts: int
    max_attempts: int

    @classmethod
    def of(cls, job: Job) -> _JobSnapshot:
        return cls(
            id=job.id,
            tenant_id=job.tenant_id,
            backbone_id=job.backbone_id,
            dataset_uri=job.dataset_uri,
            method=job.method,
            prompt_layer=job.prompt_layer,
            resolved_layers=list(job.resolved_layers) if job.resolved_layers is not None else None,
            prompt_shape=job.prompt_shape,
            hyperparameters=dict(job.hyperparameters or {}),
            name=job.name,
            target_prompt_id=job.target_prompt_id,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
        )


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


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
        assert job is not None
        JobEventRepository.add(
            session,
            job,
            "state",
            f"running on {worker_id} (attempt {job.attempts} of {job.max_attempts})",
            {"status": "running", "worker_id": worker_id, "attempt": job.attempts},
        )
        session.commit()
        snapshot = _JobSnapshot.of(job)
    log.info("job claimed", extra={"job_id": job_id, "worker_id": worker_id, "attempt": snapshot.attempts})
    return _JobRun(snapshot, session_factory, worker_id, settings, stop_event).execute()


def _settle_unclaimable(session: Session, job_id: str, now: datetime) -> None:
    """A delivery we could not claim: end jobs that can never be claimed again, leave live ones alone."""
    lease = JobLeaseRepository(session)
    job = lease.get(job_id)
    if job is None or job.lease_expires_at is None or job.lease_expires_at >= now:
        return
    if job.status == "running" and job.attempts >= job.max_attempts:
        error = {
            "code": "worker_lost",
            "message": f"the worker stopped during attempt {job.attempts}; no attempts left",
        }
        if lease.update_if_status(
            job_id, ("running",), status="failed", error=error, finished_at=now, updated_at=now
        ):
            JobEventRepository.add(
                session, job, "state", error["message"], {"status": "failed"}, level="error"
            )
    elif job.status == "cancelling" and lease.update_if_status(
        job_id, ("cancelling",), status="cancelled", finished_at=now, updated_at=now
    ):
        JobEventRepository.add(
            session, job, "state", "cancelled (its worker was gone)", {"status": "cancelled"}
        )


class _JobRun:
    def __init__(
        self,
        job: _JobSnapshot,
        session_factory: sessionmaker[Session],
        worker_id: str,
        settings: Settings,
        stop_event: threading.Event | None,
    ) -> None:
        self.job = job
        self.session_factory = session_factory
        self.worker_id = worker_id
        self.settings = settings
        self.shutdown = stop_event or threading.Event()
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._last_progress_write = 0.0
        self._epochs = int(job.hyperparameters.get("epochs", 10))

    # --- lease --------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        interval = max(0.05, min(self.settings.cancel_poll_seconds, self.settings.heartbeat_seconds))
        last_renew = time.monotonic()
        while not self._heartbeat_stop.wait(interval):
            try:
                with self.session_factory() as session:
                    lease = JobLeaseRepository(session)
                    if time.monotonic() - last_renew >= self.settings.heartbeat_seconds:
                        now = utcnow()
                        until = now + timedelta(seconds=self.settings.lease_seconds)
                        if not lease.renew(self.job.id, self.worker_id, now, until):
                            self.lease_lost.set()
                        session.commit()
                        last_renew = time.monotonic()
                    status = lease.status_if_owner(self.job.id, self.worker_id)
                    if status is None:
                        self.lease_lost.set()
                    elif status == "cancelling":
                        self.cancel_requested.set()
            except Exception:  # a DB hiccup must not kill the heartbeat; the next tick retries
                log.exception("heartbeat failed", extra={"job_id": self.job.id})

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lease_lost.is_set() or self.shutdown.is_set()

    def _check_stop(self) -> None:
        if self.should_stop():
            raise _Stop()

    # --- owned writes -------------------------------------------------------------------------------
    def _write(
        self,
        *,
        event: tuple[str, str, dict[str, Any] | None] | None = None,
        level: str = "info",
        **values: Any,
    ) -> bool:
        """Update the job (and add an event) only while we own it; False (and lease_lost) otherwise."""
        with self.session_factory() as session:
            lease = JobLeaseRepository(session)
            ok = lease.update_owned(self.job.id, self.worker_id, updated_at=utcnow(), **values)
            if not ok:
                session.rollback()
                self.lease_lost.set()
                return False
            if event is not None:
                job = lease.get(self.job.id)
                assert job is not None
                JobEventRepository.add(session, job, event[0], event[1], event[2], level=level)
            session.commit()
            return True

    def _event(
        self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info"
    ) -> None:
        self._write(event=(type_, message, data), level=level)

    # --- main ---------------------------------------------------------------------------------------
    def execute(self) -> RunOutcome:
        heartbeat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.job.id}", daemon=True)
        heartbeat.start()
        try:
            return self._execute()
        finally:
            self._heartbeat_stop.set()
            heartbeat.join(timeout=5)

    def _execute(self) -> RunOutcome:
        from service.engine import EngineError, TrainingCancelled

        try:
            return self._succeed(self._train())
        except (TrainingCancelled, _Stop):
            return self._stopped()
        except EngineError as exc:
            if self.should_stop():
                return self._stopped()
            code = str(getattr(exc, "code", "engine_error"))
            error = {"code": code, "message": str(exc) or code, "param": getattr(exc, "param", None)}
            return self._finish(
                "failed", RunOutcome.FAILED, error=error, message=f"failed: {error['message']}"
            )
        except Exception as exc:
            if self.should_stop():
                return self._stopped()
            log.exception("job crashed", extra={"job_id": self.job.id})
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            tb = traceback.format_exc(limit=8)
            if self.job.attempts >= self.job.max_attempts:
                return self._finish(
                    "failed",
                    RunOutcome.FAILED,
                    error=error,
                    message=f"failed after {self.job.attempts} attempt(s): {error['message']}",
                    data={"traceback": tb},
                )
            now = utcnow()
            ok = self._write(
                event=(
                    "state",
                    f"attempt {self.job.attempts} crashed ({error['message']}); queued for a retry",
                    {"status": "queued", "traceback": tb},
                ),
                level="warning",
                status="queued",
                error=error,
                lease_owner=None,
                lease_expires_at=None,
                enqueued_at=now,
            )
            return RunOutcome.RETRY if ok else RunOutcome.LOST

    def _stopped(self) -> RunOutcome:
        if self.lease_lost.is_set():
            log.warning("lease lost; leaving the job to its new owner", extra={"job_id": self.job.id})
            return RunOutcome.LOST
        if self.cancel_requested.is_set():
            return self._finish("cancelled", RunOutcome.CANCELLED, message="cancelled")
        # Process shutdown: give the attempt back; the next start resumes the job from its checkpoint.
        ok = self._write(
            event=("state", "interrupted by a worker shutdown; queued again", {"status": "queued"}),
            status="queued",
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
    ) -> RunOutcome:
        level = "error" if status == "failed" else "info"
        ok = self._write(
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
        )
        log.info("job finished", extra={"job_id": self.job.id, "status": status})
        return outcome if ok else RunOutcome.LOST

    # --- training -----------------------------------------------------------------------------------
    def _train(self) -> Any:
        import torch

        # The contract's module paths (docs/CONTRACTS.md §1); `fit` is looked up at call time.
        from service.engine import train as engine_train
        from service.engine.data import load_dataset, preprocess, resolve_dataset_uri, split_train_val
        from service.engine.methods import MethodConfig
        from service.engine.train import Checkpoint as EngineCheckpoint
        from service.engine.train import TrainCallbacks, TrainConfig

        settings, job = self.settings, self.job
        hp = job.hyperparameters
        path = resolve_dataset_uri(
            job.dataset_uri,
            roots=settings.data_root_paths,
            allow_http=settings.allow_http_datasets,
            max_bytes=settings.max_dataset_bytes,
            cache_dir=settings.cache_dir,
        )
        self._check_stop()
        dataset = load_dataset(path, min_images_per_class=settings.min_images_per_class)
        dataset = split_train_val(dataset, float(hp.get("val_fraction", 0.1)), int(hp.get("seed", 0)))
        report = _jsonable(dataset.report.to_dict())
        self._write(
            event=(
                "validation",
                f"dataset: {report.get('num_classes')} classes, {report.get('num_train')} train / "
                f"{report.get('num_val')} val / {report.get('num_test')} test images",
                report,
            ),
            validation_report=report,
        )
        self._check_stop()

        with self.session_factory() as session:
            row = BackboneRepository(session).get(job.backbone_id)
            if row is None:
                from service.engine import BackboneError

                raise BackboneError(f"backbone {job.backbone_id!r} was deleted")
            spec, spec_hash = dict(row.spec), row.spec_hash
        device = settings.resolved_device()
        backbone = TRAINING_BACKBONES.get(spec, spec_hash, device)
        bspec = backbone.spec

        def tensors(images: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
            x = preprocess(images, bspec.input_size, bspec.mean, bspec.std)
            return x, torch.as_tensor(labels, dtype=torch.long)

        train = tensors(dataset.train.images, dataset.train.labels)
        val = tensors(dataset.val.images, dataset.val.labels) if dataset.val is not None else None
        test = tensors(dataset.test.images, dataset.test.labels) if dataset.test is not None else None
        self._check_stop()

        layers = job.resolved_layers
        if job.method == "activation" and layers is None:  # "auto": a budgeted probe, once per job
            from service.engine.layer_search import auto_select_layer

            self._event("log", "searching the prompt layer (auto)")
            index, rows = auto_select_layer(
                backbone,
                train,
                val,
                num_classes=len(dataset.classes),
                on_row=lambda row: self._event(
                    "layer_search",
                    f"probed layer {row.get('index')}: val acc {row.get('val_accuracy')}",
                    _jsonable(row),
                ),
            )
            layers = [int(index)]
            self._write(
                event=(
                    "layer_search",
                    f"auto selected layer {index}",
                    {"layer": int(index), "sweep": _jsonable(rows)},
                ),
                resolved_layers=layers,
            )
            self._check_stop()

        method_config = MethodConfig(
            num_classes=len(dataset.classes),
            prompt_layers=tuple(layers or ()),
            prompt_shape=job.prompt_shape,
        )
        train_config = TrainConfig(**{k: hp[k] for k in _TRAIN_CONFIG_KEYS if k in hp})
        self._epochs = train_config.epochs

        resume = None
        with self.session_factory() as session:
            latest = CheckpointRepository.latest(session, job.id)
            if latest is not None:
                resume = EngineCheckpoint.from_bytes(latest.data)
        if resume is not None:
            self._event(
                "log", f"resuming from the checkpoint after epoch {resume.epoch}", {"epoch": resume.epoch}
            )

        callbacks = TrainCallbacks(
            on_progress=self._on_progress,
            on_epoch_end=self._on_epoch_end,
            on_checkpoint=self._on_checkpoint,
            should_stop=self.should_stop,
        )
        self._event(
            "log",
            f"training {job.method} on layers {list(method_config.prompt_layers)} "
            f"for {train_config.epochs} epochs "
            f"on {device}",
            {"layers": list(method_config.prompt_layers), "device": device},
        )
        result = engine_train.fit(
            backbone,
            job.method,
            method_config,
            train,
            val,
            test,
            train_config,
            classes=list(dataset.classes),
            callbacks=callbacks,
            resume=resume,
        )
        return _TrainOutput(result=result, layers=list(method_config.prompt_layers))

    # --- callbacks (called on the training thread) ------------------------------------------------
    def _on_progress(self, event: Any) -> None:
        now = time.monotonic()
        if now - self._last_progress_write < self.settings.progress_event_seconds:
            return
        self._last_progress_write = now
        progress = {
            "epoch": int(event.epoch),
            "epochs": int(event.epochs),
            "fraction": float(event.fraction),
            "step": int(event.step),
            "steps": int(event.steps),
        }
        self._write(
            event=(
                "progress",
                f"epoch {event.epoch}/{event.epochs} step {event.step}/{event.steps} loss {event.loss:.4f}",
                _jsonable(asdict(event)),
            ),
            progress=progress,
        )

    def _on_epoch_end(self, metrics: Any) -> None:
        data = _jsonable(asdict(metrics))
        val = f", val acc {metrics.val_accuracy:.4f}" if metrics.val_accuracy is not None else ""
        self._write(
            event=(
                "epoch",
                f"epoch {metrics.epoch}: loss {metrics.train_loss:.4f}, "
                f"train acc {metrics.train_accuracy:.4f}{val}",
                data,
            ),
            progress={
                "epoch": int(metrics.epoch),
                "epochs": self._epochs,
                "fraction": min(1.0, int(metrics.epoch) / max(1, self._epochs)),
            },
        )

    def _on_checkpoint(self, checkpoint: Any) -> None:
        data = checkpoint.to_bytes()
        with self.session_factory() as session:
            lease = JobLeaseRepository(session)
            if not lease.update_owned(self.job.id, self.worker_id, updated_at=utcnow()):
                session.rollback()
                self.lease_lost.set()
                return
            session.add(
                Checkpoint(
                    job_id=self.job.id,
                    tenant_id=self.job.tenant_id,
                    epoch=int(checkpoint.epoch),
                    attempt=self.job.attempts,
                    size_bytes=len(data),
                    data=data,
                )
            )
            session.flush()
            CheckpointRepository.prune(session, self.job.id, self.settings.checkpoints_keep)
            session.commit()

    # --- success ------------------------------------------------------------------------------------
    def _succeed(self, output: _TrainOutput) -> RunOutcome:
        result = output.result
        artifact = result.artifact
        data = artifact.to_bytes()
        metrics = _jsonable(result.metrics)
        for _ in range(3):  # a concurrent retrain of the same prompt may take our version number
            with self.session_factory() as session:
                try:
                    prompt = store_prompt(
                        session,
                        self.job.tenant_id,
                        artifact=data,
                        backbone_id=self.job.backbone_id,
                        method=self.job.method,
                        prompt_layers=output.layers,
                        prompt_shape=self.job.prompt_shape if self.job.method == "activation" else None,
                        classes=[str(c) for c in artifact.classes],
                        metrics=metrics,
                        name=self.job.name,
                        job_id=self.job.id,
                        prompt_id=self.job.target_prompt_id,
                    )
                except IntegrityError:
                    session.rollback()
                    continue
                now = utcnow()
                lease = JobLeaseRepository(session)
                if not lease.update_owned(
                    self.job.id,
                    self.worker_id,
                    status="succeeded",
                    prompt_id=prompt.prompt_id,
                    prompt_version=prompt.version,
                    metrics=metrics,
                    error=None,
                    progress={"epoch": self._epochs, "epochs": self._epochs, "fraction": 1.0},
                    finished_at=now,
                    lease_expires_at=None,
                    updated_at=now,
                ):
                    session.rollback()
                    self.lease_lost.set()
                    return RunOutcome.LOST
                job = lease.get(self.job.id)
                assert job is not None
                JobEventRepository.add(
                    session,
                    job,
                    "state",
                    f"succeeded: prompt {prompt.prompt_id}@{prompt.version} ({prompt.size_bytes} bytes)",
                    {
                        "status": "succeeded",
                        "prompt": f"{prompt.prompt_id}@{prompt.version}",
                        "metrics": metrics,
                    },
                )
                session.commit()
                log.info(
                    "job succeeded",
                    extra={"job_id": self.job.id, "prompt": f"{prompt.prompt_id}@{prompt.version}"},
                )
                return RunOutcome.SUCCEEDED
        raise RuntimeError("could not allocate a prompt version")


@dataclass
class _TrainOutput:
    result: Any
    layers: list[int]
