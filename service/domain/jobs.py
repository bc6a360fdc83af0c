"""Job submission, listing, cancellation, events and checkpoints (the tenant's view of training)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.ids import new_id
from service.db.models import Checkpoint, Job, JobEvent
from service.db.repositories import (
    CheckpointRepository,
    JobEventRepository,
    JobLeaseRepository,
    JobRepository,
    PromptRepository,
)
from service.domain.backbones import get_backbone, resolve_layers
from service.domain.errors import BadRequest, Conflict, InvalidInput, NotFound, TooManyRequests
from service.settings import Settings


@dataclass(frozen=True)
class JobRequest:
    backbone: str
    dataset_uri: str
    prompt_layer: Any = None  # int | str | list | "all" | "auto" | None (= recommended)
    method: str = "activation"
    prompt_shape: str = "full"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_id: str | None = None  # retrain: the result becomes a new version of this prompt

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


def servable_methods() -> list[str]:
    from service.engine.methods import list_methods

    return list(list_methods(servable_only=True))


def check_dataset_uri(uri: str, settings: Settings) -> None:
    """Cheap checks at submission (no download): scheme, and file:// inside DATA_ROOTS and present."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BadRequest(
                "file:// URIs must be local paths", code="invalid_dataset_uri", param="dataset_uri"
            )
        path = Path(unquote(parsed.path)).resolve()
        roots = settings.data_root_paths
        if not any(path.is_relative_to(root) for root in roots):
            raise BadRequest(
                f"dataset path {path} is outside the configured data roots ({':'.join(map(str, roots))})",
                code="invalid_dataset_uri",
                param="dataset_uri",
            )
        if not path.exists():
            raise BadRequest(
                f"dataset path {path} does not exist", code="invalid_dataset_uri", param="dataset_uri"
            )
    elif scheme in ("http", "https"):
        if not settings.allow_http_datasets:
            raise BadRequest(
                "http(s) dataset URIs are disabled", code="invalid_dataset_uri", param="dataset_uri"
            )
        if not parsed.hostname:
            raise BadRequest("dataset URI has no host", code="invalid_dataset_uri", param="dataset_uri")
    else:
        raise BadRequest(
            f"unsupported dataset URI scheme {scheme or '(none)'!r}: use file:// or https://",
            code="invalid_dataset_uri",
            param="dataset_uri",
        )


def create_job(
    session: Session, tenant_id: str, request: JobRequest, *, idempotency_key: str | None, settings: Settings
) -> tuple[Job, bool]:
    """Validate and insert a `queued` job (not committed); returns (job, created=False on a replay)."""
    jobs = JobRepository(session, tenant_id)
    fingerprint = request.fingerprint()
    if idempotency_key:
        existing = find_idempotent_job(session, tenant_id, idempotency_key, fingerprint)
        if existing is not None:
            return existing, False
    backbone = get_backbone(session, request.backbone, param="backbone")
    methods = servable_methods()
    if request.method not in methods:
        raise InvalidInput(
            f"unknown method {request.method!r}; one of {', '.join(methods)}",
            code="invalid_method",
            param="method",
        )
    if request.method == "activation":
        resolved: list[int] | None = (
            None if request.prompt_layer == "auto" else list(resolve_layers(backbone, request.prompt_layer))
        )
    else:
        if request.prompt_layer is not None:
            raise InvalidInput(
                f"prompt_layer applies to method 'activation' only, not {request.method!r}",
                code="invalid_prompt_layer",
                param="prompt_layer",
            )
        resolved = []
    check_dataset_uri(request.dataset_uri, settings)
    if request.prompt_id is not None and not PromptRepository(session, tenant_id).exists(request.prompt_id):
        raise NotFound(f"no prompt {request.prompt_id!r}", code="prompt_not_found", param="prompt_id")
    if jobs.count_active() >= settings.max_active_jobs_per_tenant:
        raise TooManyRequests(
            f"at most {settings.max_active_jobs_per_tenant} active jobs per tenant",
            code="too_many_active_jobs",
        )
    now = utcnow()
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        status="queued",
        backbone_id=backbone.id,
        dataset_uri=request.dataset_uri,
        method=request.method,
        prompt_layer=request.prompt_layer,
        resolved_layers=resolved,
        prompt_shape=request.prompt_shape,
        hyperparameters=dict(request.hyperparameters),
        name=request.name,
        metadata_=dict(request.metadata),
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        target_prompt_id=request.prompt_id,
        progress={"epoch": 0, "epochs": int(request.hyperparameters.get("epochs", 0)), "fraction": 0.0},
        attempts=0,
        max_attempts=settings.max_attempts,
        requeues=0,
        enqueued_at=now,
        created_at=now,
        updated_at=now,
    )
    jobs.add(job)
    JobEventRepository.add(session, job, "state", "job created and validated; queued", {"status": "queued"})
    return job, True


def find_idempotent_job(session: Session, tenant_id: str, key: str, fingerprint: str) -> Job | None:
    """The job an `Idempotency-Key` already created; Conflict when the same key came with another body."""
    existing = JobRepository(session, tenant_id).find_by_idempotency_key(key)
    if existing is not None and existing.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    return existing


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = JobRepository(session, tenant_id).get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found", param="job_id")
    return job


def list_jobs(
    session: Session, tenant_id: str, *, limit: int, after: str | None, status: str | None
) -> list[Job]:
    return JobRepository(session, tenant_id).list(limit=limit, after=after, status=status)


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """Queued → cancelled at once; running → cancelling (the runner ends it); finished → Conflict."""
    job = get_job(session, tenant_id, job_id)
    lease = JobLeaseRepository(session)
    now = utcnow()
    if lease.update_if_status(
        job.id, ("validating", "queued"), status="cancelled", finished_at=now, updated_at=now
    ):
        JobEventRepository.add(session, job, "state", "cancelled before it ran", {"status": "cancelled"})
    elif lease.update_if_status(job.id, ("running",), status="cancelling", updated_at=now):
        JobEventRepository.add(session, job, "state", "cancel requested", {"status": "cancelling"})
    else:
        session.refresh(job)
        if job.status in ("succeeded", "failed"):
            raise Conflict(f"job {job.id} already {job.status}", code="job_not_cancellable", param="job_id")
    session.flush()
    session.refresh(job)
    return job


def list_events(
    session: Session, tenant_id: str, job_id: str, *, after: int | None, limit: int
) -> list[JobEvent]:
    get_job(session, tenant_id, job_id)
    return JobEventRepository(session, tenant_id).list(job_id, after=after, limit=limit)


def list_checkpoints(session: Session, tenant_id: str, job_id: str) -> list[Checkpoint]:
    get_job(session, tenant_id, job_id)
    return CheckpointRepository(session, tenant_id).list(job_id)


def job_counts(session: Session) -> dict[str, int]:
    return JobLeaseRepository(session).count_by_status()
