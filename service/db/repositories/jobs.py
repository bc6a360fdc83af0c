"""Jobs, their events and checkpoints: tenant-scoped reads for the API, lease operations for the runner."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from actprompt.states import ACTIVE_JOB_STATES, JobStatus
from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import Checkpoint, Job, JobEvent
from service.db.repositories.base import TenantScopedRepository


class JobRepository(TenantScopedRepository[Job]):
    model = Job

    def add(self, job: Job) -> Job:
        self.check_tenant(job)
        self.session.add(job)
        self.session.flush()
        return job

    def get(self, job_id: str, *, for_update: bool = False) -> Job | None:
        stmt = self.base_statement().where(Job.id == job_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalars(stmt).first()

    def find_by_idempotency_key(self, key: str) -> Job | None:
        return self.session.scalars(self.base_statement().where(Job.idempotency_key == key)).first()

    def list(self, *, limit: int, after: str | None = None, status: str | None = None) -> list[Job]:
        stmt = self.base_statement().order_by(Job.id.desc()).limit(limit)
        if after:
            stmt = stmt.where(Job.id < after)
        if status:
            stmt = stmt.where(Job.status == status)
        return list(self.session.scalars(stmt))

    def count_active(self) -> int:
        stmt = select(func.count()).where(Job.tenant_id == self.tenant_id, Job.status.in_(ACTIVE_JOB_STATES))
        return int(self.session.scalar(stmt) or 0)


class JobEventRepository(TenantScopedRepository[JobEvent]):
    model = JobEvent

    def list(self, job_id: str, *, after: int | None, limit: int) -> list[JobEvent]:
        stmt = self.base_statement().where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit)
        if after is not None:
            stmt = stmt.where(JobEvent.id > after)
        return list(self.session.scalars(stmt))

    @staticmethod
    def add(
        session: Session,
        job: Job,
        type: str,
        message: str,
        data: dict[str, Any] | None = None,
        *,
        level: str = "info",
    ) -> JobEvent:
        event = JobEvent(
            job_id=job.id, tenant_id=job.tenant_id, type=type, message=message, data=data, level=level
        )
        session.add(event)
        return event


class CheckpointRepository(TenantScopedRepository[Checkpoint]):
    model = Checkpoint

    def list(self, job_id: str) -> list[Checkpoint]:
        stmt = self.base_statement().where(Checkpoint.job_id == job_id).order_by(Checkpoint.epoch.desc())
        return list(self.session.scalars(stmt))

    # --- system scope (the job runner) ---------------------------------------------------------------
    @staticmethod
    def latest(session: Session, job_id: str) -> Checkpoint | None:
        stmt = (
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.epoch.desc(), Checkpoint.id.desc())
            .limit(1)
        )
        return session.scalars(stmt).first()

    @staticmethod
    def prune(session: Session, job_id: str, keep: int) -> None:
        """Delete all but the `keep` newest checkpoints of a job."""
        keep_ids = (
            select(Checkpoint.id)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.id.desc())
            .limit(keep)
        )
        stmt = delete(Checkpoint).where(
            Checkpoint.job_id == job_id, Checkpoint.id.not_in(list(session.scalars(keep_ids)))
        )
        session.execute(stmt)


class JobLeaseRepository:
    """System scope: the conditional updates with which workers claim, renew and finish jobs."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, job_id: str) -> Job | None:
        return self.session.get(Job, job_id, populate_existing=True)

    def claim(self, job_id: str, worker_id: str, now: datetime, lease_until: datetime) -> bool:
        """Take the job if it is queued, validating or running with no live lease; one winner per lease.

        A `validating` job stays `validating` (the runner validates its dataset, then moves it to
        `running`); a `queued` one (re-queued after a crash, already validated once) becomes `running`.
        """
        no_live_lease = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
        claimable = or_(
            Job.status == JobStatus.QUEUED,
            and_(Job.status.in_((JobStatus.VALIDATING, JobStatus.RUNNING)), no_live_lease),
        )
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.attempts < Job.max_attempts, claimable)
            .values(
                status=case(
                    (Job.status == JobStatus.VALIDATING, JobStatus.VALIDATING), else_=JobStatus.RUNNING
                ),
                lease_owner=worker_id,
                worker_id=worker_id,
                lease_expires_at=lease_until,
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                started_at=func.coalesce(Job.started_at, now),
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(self.session.execute(stmt).rowcount == 1)  # type: ignore[attr-defined]

    def renew(self, job_id: str, worker_id: str, now: datetime, lease_until: datetime) -> bool:
        """Extend our lease; False when someone else owns the job now."""
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == worker_id)
            .values(lease_expires_at=lease_until, heartbeat_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(self.session.execute(stmt).rowcount == 1)  # type: ignore[attr-defined]

    def status_if_owner(self, job_id: str, worker_id: str) -> str | None:
        stmt = select(Job.status).where(Job.id == job_id, Job.lease_owner == worker_id)
        return self.session.scalar(stmt)

    def update_owned(
        self, job_id: str, worker_id: str, *, statuses: tuple[str, ...] | None = None, **values: Any
    ) -> bool:
        """Write only while we hold the lease: a worker that lost its job cannot overwrite the new owner.

        `statuses`: also require one of these (so `validating -> running` cannot overwrite a cancel)."""
        conditions = [Job.id == job_id, Job.lease_owner == worker_id]
        if statuses is not None:
            conditions.append(Job.status.in_(statuses))
        stmt = update(Job).where(*conditions).values(**values).execution_options(synchronize_session=False)
        return bool(self.session.execute(stmt).rowcount == 1)  # type: ignore[attr-defined]

    def update_if_status(self, job_id: str, statuses: Collection[str], **values: Any) -> bool:
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.status.in_(statuses))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(self.session.execute(stmt).rowcount == 1)  # type: ignore[attr-defined]

    def cancel_unclaimed(self, job_id: str, now: datetime) -> bool:
        """Cancel a job no worker holds (queued, or validating and never claimed)."""
        unclaimed = or_(
            Job.status == JobStatus.QUEUED,
            and_(Job.status == JobStatus.VALIDATING, Job.lease_owner.is_(None)),
        )
        stmt = (
            update(Job)
            .where(Job.id == job_id, unclaimed)
            .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(self.session.execute(stmt).rowcount == 1)  # type: ignore[attr-defined]

    def expired_leases(self, now: datetime, *, limit: int = 100) -> list[Job]:
        stmt = (
            select(Job)
            .where(
                Job.status.in_((JobStatus.VALIDATING, JobStatus.RUNNING, JobStatus.CANCELLING)),
                Job.lease_expires_at < now,
            )
            .order_by(Job.id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def with_status(self, statuses: tuple[str, ...], *, limit: int = 1000) -> list[Job]:
        stmt = select(Job).where(Job.status.in_(statuses)).order_by(Job.id).limit(limit)
        return list(self.session.scalars(stmt))

    def stale_queued(self, enqueued_before: datetime, *, limit: int = 100) -> list[Job]:
        stmt = (
            select(Job)
            .where(
                or_(
                    Job.status == JobStatus.QUEUED,
                    and_(Job.status == JobStatus.VALIDATING, Job.lease_owner.is_(None)),
                ),
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < enqueued_before),
            )
            .order_by(Job.id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def count_by_status(self) -> dict[str, int]:
        stmt = select(Job.status, func.count()).group_by(Job.status)
        return {status: int(n) for status, n in self.session.execute(stmt).all()}
