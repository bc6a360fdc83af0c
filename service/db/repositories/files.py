"""Uploaded files and evaluations: tenant-scoped reads, plus the system-scope sweep of orphans."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from actprompt.states import ACTIVE_EVALUATION_STATES, ACTIVE_JOB_STATES
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import Evaluation, File, Job
from service.db.repositories.base import TenantScopedRepository


class FileRepository(TenantScopedRepository[File]):
    model = File

    def add(self, row: File) -> File:
        self.check_tenant(row)
        self.session.add(row)
        self.session.flush()
        return row

    def get(self, file_id: str) -> File | None:
        return self.session.scalars(self.base_statement().where(File.id == file_id)).first()

    def users(self, file_id: str) -> list[str]:
        """Ids of this tenant's unfinished jobs and evaluations that read the file."""
        jobs = select(Job.id).where(
            Job.tenant_id == self.tenant_id, Job.dataset_uri == file_id, Job.status.in_(ACTIVE_JOB_STATES)
        )
        evals = select(Evaluation.id).where(
            Evaluation.tenant_id == self.tenant_id,
            Evaluation.dataset_uri == file_id,
            Evaluation.status.in_(ACTIVE_EVALUATION_STATES),
        )
        return list(self.session.scalars(jobs)) + list(self.session.scalars(evals))

    def list(self, *, limit: int, after: str | None = None) -> list[File]:
        stmt = self.base_statement().order_by(File.id.desc()).limit(limit)
        if after:
            stmt = stmt.where(File.id < after)
        return list(self.session.scalars(stmt))

    def delete(self, row: File) -> None:
        self.session.delete(row)
        self.session.flush()


class EvaluationRepository(TenantScopedRepository[Evaluation]):
    model = Evaluation

    def add(self, row: Evaluation) -> Evaluation:
        self.check_tenant(row)
        self.session.add(row)
        self.session.flush()
        return row

    def get(self, evaluation_id: str) -> Evaluation | None:
        return self.session.scalars(self.base_statement().where(Evaluation.id == evaluation_id)).first()

    def list(self, *, limit: int, after: str | None = None, status: str | None = None) -> list[Evaluation]:
        stmt = self.base_statement().order_by(Evaluation.id.desc()).limit(limit)
        if after:
            stmt = stmt.where(Evaluation.id < after)
        if status:
            stmt = stmt.where(Evaluation.status == status)
        return list(self.session.scalars(stmt))

    def count_active(self) -> int:
        stmt = select(func.count()).where(
            Evaluation.tenant_id == self.tenant_id, Evaluation.status.in_(ACTIVE_EVALUATION_STATES)
        )
        return int(self.session.scalar(stmt) or 0)


class EvaluationRunRepository:
    """System scope: the API process that runs an evaluation claims it, renews it and finishes it."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, evaluation_id: str) -> Evaluation | None:
        return self.session.get(Evaluation, evaluation_id, populate_existing=True)

    def update_if(self, evaluation_id: str, statuses: Collection[str], **values: Any) -> bool:
        stmt = (
            update(Evaluation)
            .where(Evaluation.id == evaluation_id, Evaluation.status.in_(statuses))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(self.session.execute(stmt).rowcount == 1)  # type: ignore[attr-defined]

    def fail_stale(self, heartbeat_before: datetime, error: dict[str, Any], now: datetime) -> int:
        """End every queued/running evaluation whose runner stopped renewing it (a crashed API process)."""
        stmt = (
            update(Evaluation)
            .where(
                Evaluation.status.in_(ACTIVE_EVALUATION_STATES),
                or_(
                    Evaluation.heartbeat_at < heartbeat_before,
                    Evaluation.heartbeat_at.is_(None) & (Evaluation.created_at < heartbeat_before),
                ),
            )
            .values(status="failed", error=error, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return int(self.session.execute(stmt).rowcount)  # type: ignore[attr-defined]
