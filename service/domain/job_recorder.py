"""Turns the training pipeline's callbacks into job events, progress and checkpoints (owned writes only)."""

from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass
from typing import Any

from service.db.base import utcnow
from service.db.models import Checkpoint
from service.db.repositories import CheckpointRepository, JobLeaseRepository
from service.domain.job_lease import JobLease


def jsonable(value: Any) -> Any:
    """A JSON-able copy of engine values (dataclasses, tuples, numpy/torch scalars)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class JobRecorder:
    """The callbacks of one attempt; every write goes through the lease (a lost lease writes nothing)."""

    def __init__(self, lease: JobLease, tenant_id: str, attempt: int, epochs: int) -> None:
        self.lease = lease
        self.tenant_id = tenant_id
        self.attempt = attempt
        self.epochs = epochs
        self._last_progress_write = 0.0

    def callbacks(self) -> Any:
        """The engine's `PipelineCallbacks` bound to this recorder."""
        from service.engine.pipeline import PipelineCallbacks

        return PipelineCallbacks(
            on_progress=self.on_progress,
            on_epoch_end=self.on_epoch_end,
            on_checkpoint=self.on_checkpoint,
            should_stop=self.lease.should_stop,
            on_layer_probe=self.on_layer_probe,
            on_layer_selected=self.on_layer_selected,
            on_start=self.on_start,
            on_candidate=self.on_candidate,
        )

    def on_candidate(self, row: dict[str, Any]) -> None:
        """One row of the `auto` method search (the console draws the table from these events)."""
        if row.get("val_accuracy") is None:
            message = f"candidate {row.get('label')}: skipped ({row.get('skipped')})"
        else:
            message = (
                f"candidate {row.get('label')}: val acc {row['val_accuracy']:.4f}, "
                f"{row.get('trainable_params')} trainable parameters, {row.get('train_seconds')} s, "
                f"{row.get('serving_ms_per_image')} ms per image served"
            )
        self.lease.event("method_search", message, jsonable(row))

    def on_layer_probe(self, row: dict[str, Any]) -> None:
        message = f"probed layer {row.get('index')}: val acc {row.get('val_accuracy')}"
        self.lease.event("layer_search", message, jsonable(row))

    def on_layer_selected(self, index: int, rows: list[dict[str, Any]]) -> None:
        self.lease.write(
            event=("layer_search", f"auto selected layer {index}", {"layer": index, "sweep": jsonable(rows)}),
            resolved_layers=[index],
        )
        self.lease.check_stop()

    def on_start(self, method: str, method_config: Any, train_config: Any) -> None:
        self.epochs = int(train_config.epochs)
        layers = list(method_config.prompt_layers)
        self.lease.event(
            "log",
            f"training {method} on layers {layers} for {train_config.epochs} epochs",
            {"layers": layers},
        )

    def on_progress(self, event: Any) -> None:
        now = time.monotonic()
        if now - self._last_progress_write < self.lease.settings.progress_event_seconds:
            return
        self._last_progress_write = now
        progress = {
            "epoch": int(event.epoch),
            "epochs": int(event.epochs),
            "fraction": float(event.fraction),
            "step": int(event.step),
            "steps": int(event.steps),
        }
        self.lease.write(
            event=(
                "progress",
                f"epoch {event.epoch}/{event.epochs} step {event.step}/{event.steps} loss {event.loss:.4f}",
                jsonable(event),
            ),
            progress=progress,
        )

    def on_epoch_end(self, metrics: Any) -> None:
        val = f", val acc {metrics.val_accuracy:.4f}" if metrics.val_accuracy is not None else ""
        self.lease.write(
            event=(
                "epoch",
                f"epoch {metrics.epoch}: loss {metrics.train_loss:.4f}, "
                f"train acc {metrics.train_accuracy:.4f}{val}",
                jsonable(metrics),
            ),
            progress={
                "epoch": int(metrics.epoch),
                "epochs": self.epochs,
                "fraction": min(1.0, int(metrics.epoch) / max(1, self.epochs)),
            },
        )

    def on_checkpoint(self, checkpoint: Any) -> None:
        data = checkpoint.to_bytes()
        lease = self.lease
        with lease.session_factory() as session:
            if not JobLeaseRepository(session).update_owned(
                lease.job_id, lease.worker_id, updated_at=utcnow()
            ):
                session.rollback()
                lease.lost.set()
                return
            session.add(
                Checkpoint(
                    job_id=lease.job_id,
                    tenant_id=self.tenant_id,
                    epoch=int(checkpoint.epoch),
                    attempt=self.attempt,
                    size_bytes=len(data),
                    data=data,
                )
            )
            session.flush()
            CheckpointRepository.prune(session, lease.job_id, lease.settings.checkpoints_keep)
            session.commit()
