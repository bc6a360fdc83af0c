"""Job submission, listing, cancellation, events and checkpoints (the tenant's view of training)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from actprompt.states import JobStatus
from sqlalchemy.exc import IntegrityError
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
from service.domain import files
from service.domain.backbones import get_backbone, resolve_layers
from service.domain.datasets import allowed_s3_location
from service.domain.errors import (
    BadRequest,
    Conflict,
    InvalidInput,
    NotFound,
    found,
    from_engine_error,
)
from service.domain.quota import check_active_quota
from service.settings import Settings

log = logging.getLogger("actprompt.jobs")


@dataclass(frozen=True)
class JobRequest:
    backbone: str
    dataset_uri: str
    prompt_layer: Any = None  # int | str | list | "all" | "auto" | None (= recommended)
    method: str = "activation"
    prompt_shape: str = "full"
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own (lora_rank, auto's)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_id: str | None = None  # retrain: the result becomes a new version of this prompt

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


#: Bounds on a job's free `metadata` (a 300-deep value once broke the fingerprint and every list call).
METADATA_MAX_DEPTH = 8
METADATA_MAX_BYTES = 16_384
METADATA_MAX_KEYS = 256


def check_metadata(value: Any) -> str | None:
    """What is wrong with `value` as job metadata (naming the limit), or None; iterative (any depth)."""
    if not isinstance(value, dict):
        return "metadata must be a JSON object"
    keys = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > METADATA_MAX_DEPTH:
                return f"metadata is nested deeper than {METADATA_MAX_DEPTH} levels"
            if isinstance(item, dict):
                keys += len(item)
                if keys > METADATA_MAX_KEYS:
                    return f"metadata has more than {METADATA_MAX_KEYS} keys"
                if not all(isinstance(k, str) for k in item):
                    return "metadata keys must be strings"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    try:
        size = len(json.dumps(value, separators=(",", ":")).encode())
    except (TypeError, ValueError):
        return "metadata must be plain JSON"
    if size > METADATA_MAX_BYTES:
        return f"metadata is larger than {METADATA_MAX_BYTES} bytes ({size} bytes as JSON)"
    return None


def stored_metadata(value: Any) -> dict[str, Any]:
    """A stored row's metadata as the API shows it: a row written before the bounds existed (too deep,
    too big) is replaced by a note, so one bad row never makes a list endpoint fail."""
    problem = check_metadata(value if value is not None else {})
    if problem is not None:
        return {"_unavailable": f"stored metadata exceeds the current limits: {problem}"}
    return dict(value or {})


#: Where a job row keeps its method options: inside the hyperparameters JSON, under this key.
METHOD_OPTIONS_KEY = "method_options"
#: Options with a request field of their own, never inside `method_options`.
_OWN_FIELDS = ("prompt_layers", "prompt_layer", "prompt_shape", "num_classes")


def servable_methods() -> list[str]:
    from service.engine.methods import list_methods

    return list(list_methods(servable_only=True))


def job_methods() -> list[str]:
    """What a job may ask for: every servable method, and "auto" (the search among them)."""
    from service.engine.method_search import AUTO

    return [*servable_methods(), AUTO]


def _check_auto(request: JobRequest) -> list[int]:
    from service.engine import EngineError
    from service.engine.method_search import AutoConfig

    if request.prompt_layer is not None:
        raise InvalidInput(
            "prompt_layer does not apply to method 'auto' (each candidate has its own)",
            code="invalid_prompt_layer",
            param="prompt_layer",
        )
    if request.prompt_shape != "full":
        raise InvalidInput(
            "prompt_shape does not apply to method 'auto'", code="option_not_applicable", param="prompt_shape"
        )
    try:
        AutoConfig.from_options(request.method_options)
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    return []


def check_method(backbone: Any, request: JobRequest) -> list[int] | None:
    """The cheap synchronous checks of the method and its options (the registry and the engine's own
    per-method config decide); returns the resolved prompt layers (None = "auto", probed by the runner)."""
    from service.engine import EngineError, MethodConfig, get_method_class
    from service.engine.method_search import AUTO

    methods = job_methods()
    if request.method not in methods:
        raise InvalidInput(
            f"unknown method {request.method!r}; one of {', '.join(methods)}",
            code="invalid_method",
            param="method",
        )
    for key in request.method_options:
        if key in _OWN_FIELDS:
            raise InvalidInput(
                f"{key} is not a method option (it has a request field of its own)",
                code="invalid_method_option",
                param=key,
            )
    if request.method == AUTO:
        return _check_auto(request)
    resolved: list[int] | None = []
    cls = get_method_class(request.method)
    if cls.uses_prompt_layers():
        requested = request.prompt_layer if request.prompt_layer is not None else cls.default_prompt_layer
        resolved = None if requested == "auto" else list(resolve_layers(backbone, requested))
    try:
        MethodConfig.for_method(
            request.method,
            num_classes=2,
            prompt_layers=tuple(resolved or ()) if request.prompt_layer != "auto" else (),
            prompt_shape=request.prompt_shape,
            **request.method_options,
        )
        if request.prompt_layer is not None and not cls.uses_prompt_layers():
            raise EngineError(
                f"prompt_layer applies to methods with prompt layers, not {request.method!r}",
                code="invalid_prompt_layer",
                param="prompt_layer",
            )
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    return resolved


def check_dataset_uri(uri: str, settings: Settings) -> None:
    """Cheap checks at submission (no download): scheme, file:// inside DATA_ROOTS and present, s3:// under
    an allowed prefix (403 otherwise)."""
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
    elif scheme == "s3":
        allowed_s3_location(uri, settings)
    else:
        raise BadRequest(
            f"unsupported dataset URI scheme {scheme or '(none)'!r}: use file://, https:// or s3://",
            code="invalid_dataset_uri",
            param="dataset_uri",
        )


def check_dataset(session: Session, tenant_id: str, uri: str, settings: Settings) -> None:
    """An uploaded file of this tenant (a foreign or unknown id is a 404), or a URI that passes the checks."""
    if files.is_file_id(uri):
        files.get_file(session, tenant_id, uri, param="dataset_uri")
    else:
        check_dataset_uri(uri, settings)


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
    resolved = check_method(backbone, request)
    check_dataset(session, tenant_id, request.dataset_uri, settings)
    if request.prompt_id is not None and not PromptRepository(session, tenant_id).exists(request.prompt_id):
        raise NotFound(f"no prompt {request.prompt_id!r}", code="prompt_not_found", param="prompt_id")
    check_active_quota(jobs.count_active(), settings, "jobs")
    now = utcnow()
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        status=JobStatus.VALIDATING,
        backbone_id=backbone.id,
        dataset_uri=request.dataset_uri,
        method=request.method,
        prompt_layer=request.prompt_layer,
        resolved_layers=resolved,
        prompt_shape=request.prompt_shape,
        hyperparameters={
            **request.hyperparameters,
            **({METHOD_OPTIONS_KEY: dict(request.method_options)} if request.method_options else {}),
        },
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
    JobEventRepository.add(
        session, job, "state", "job created; its dataset is validated next", {"status": JobStatus.VALIDATING}
    )
    return job, True


def submit_job(
    session: Session, tenant_id: str, request: JobRequest, *, idempotency_key: str | None, settings: Settings
) -> tuple[Job, bool]:
    """Create and commit a job; with an `Idempotency-Key`, every concurrent caller gets the one job.

    Two requests with the same key can both miss the existing row and both insert: the database's unique
    index (tenant, key) lets one commit and fails the other, at the flush or at the commit depending on the
    interleaving and the engine (PostgreSQL waits for the winner, then raises). The loser rolls back and
    answers with the winner's job (`created=False`), as a plain replay would.
    """
    try:
        job, created = create_job(
            session, tenant_id, request, idempotency_key=idempotency_key, settings=settings
        )
        if created:
            session.commit()
        return job, created
    except IntegrityError:
        session.rollback()
        if not idempotency_key:
            raise
    winner = find_idempotent_job(session, tenant_id, idempotency_key, request.fingerprint())
    if winner is None:  # the other request rolled back after all: the caller may simply retry
        raise Conflict(
            "a concurrent request with the same Idempotency-Key did not complete; retry",
            code="idempotency_conflict",
            param="Idempotency-Key",
        )
    return winner, False


class _Enqueuer(Protocol):
    def enqueue(self, job_id: str) -> None: ...


def dispatch(session: Session, queue: _Enqueuer, job: Job) -> bool:
    """Send a committed job to the queue; if the broker is down, mark it unsent for the reaper's next pass.

    `enqueued_at = NULL` means "no message was ever sent": the reaper re-sends such jobs at its next pass
    (`Settings.reaper_interval_seconds`), without waiting for `queued_stale_seconds`, so a job submitted
    during a broker outage starts as soon as the broker and a reaper are back. Returns whether it was sent.
    """
    try:
        queue.enqueue(job.id)  # only after the commit: a worker must find the row
        return True
    except Exception:
        log.warning("enqueue failed; the reaper will send the job", exc_info=True, extra={"job_id": job.id})
    try:
        JobLeaseRepository(session).update_if_status(
            job.id, (JobStatus.VALIDATING, JobStatus.QUEUED), enqueued_at=None
        )
        session.commit()
    except Exception:  # the database too: the job still goes out once its queued_stale_seconds are up
        session.rollback()
        log.exception("could not mark the job unsent", extra={"job_id": job.id})
    return False


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
    return found(JobRepository(session, tenant_id).get(job_id), "job", job_id, param="job_id")


def list_jobs(
    session: Session, tenant_id: str, *, limit: int, after: str | None, status: str | None
) -> list[Job]:
    return JobRepository(session, tenant_id).list(limit=limit, after=after, status=status)


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """Not yet claimed → cancelled at once; claimed (validating or running) → cancelling (the runner ends
    it); finished → Conflict."""
    job = get_job(session, tenant_id, job_id)
    lease = JobLeaseRepository(session)
    now = utcnow()
    if lease.cancel_unclaimed(job.id, now):
        JobEventRepository.add(
            session, job, "state", "cancelled before it ran", {"status": JobStatus.CANCELLED}
        )
    elif lease.update_if_status(
        job.id, (JobStatus.VALIDATING, JobStatus.RUNNING), status=JobStatus.CANCELLING, updated_at=now
    ):
        JobEventRepository.add(session, job, "state", "cancel requested", {"status": JobStatus.CANCELLING})
    else:
        session.refresh(job)
        if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
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
