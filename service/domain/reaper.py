"""The reaper: re-queues jobs whose worker is gone (lease expired) or whose broker message was lost.

The database is the source of truth: whatever the broker holds, a job that is `validating`,
`queued` or `running` in the database eventually runs or ends `failed` with the reason, after a bounded
number of attempts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from actprompt.states import JobStatus
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.db.models import Job
from service.db.repositories import JobEventRepository, JobLeaseRepository
from service.settings import Settings

log = logging.getLogger("actprompt.reaper")


class _Enqueuer(Protocol):
    def enqueue(self, job_id: str) -> None: ...


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)  # lease expired, attempts left
    resent: list[str] = field(default_factory=list)  # queued but never claimed: sent to the broker again
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


def reap(
    session_factory: sessionmaker[Session],
    queue: _Enqueuer,
    settings: Settings,
    *,
    now: datetime | None = None,
    takeover: bool = False,
    requeue_stale_queued: bool = True,
    owner_alive: Callable[[str], bool] = lambda _owner: False,
) -> ReapReport:
    """One pass. `takeover=True` (an embedded front starting up) treats every lease as expired, except those
    whose owner `owner_alive` says still runs (a sibling front of the same `serve`), and re-sends every queued
    job; those leases are left to expire as usual, if their owner dies after all."""
    now = now or utcnow()
    report = ReapReport()
    to_send: list[str] = []
    with session_factory() as session:
        lease = JobLeaseRepository(session)
        if takeover:
            held = lease.with_status((JobStatus.VALIDATING, JobStatus.RUNNING, JobStatus.CANCELLING))
            orphans = [
                job
                for job in held
                if (job.status != JobStatus.VALIDATING or job.lease_owner is not None)
                and not (job.lease_owner and owner_alive(job.lease_owner))
            ]
        else:
            orphans = lease.expired_leases(now)
        for job in orphans:
            _reap_orphan(session, job, now, report, to_send)
        if takeover:
            for job in lease.with_status((JobStatus.VALIDATING, JobStatus.QUEUED)):
                if job.status == JobStatus.QUEUED or job.lease_owner is None:  # never claimed: send again
                    to_send.append(job.id)
                    report.resent.append(job.id)
        elif requeue_stale_queued:
            stale_before = now - timedelta(seconds=settings.queued_stale_seconds)
            stale = lease.stale_queued(stale_before)
            waiting = _waiting_in_broker(queue) if stale else None
            for job in stale:
                if waiting is not None and job.id in waiting:
                    continue  # its message is in the broker, waiting its turn: not lost, nothing to re-send
                _resend_stale(session, job, now, settings, report, to_send)
        session.commit()
    for job_id in to_send:
        try:
            queue.enqueue(job_id)
        except Exception:  # the broker is down: the next pass sends it again
            log.exception("re-enqueue failed", extra={"job_id": job_id})
    if report.requeued or report.resent or report.failed or report.cancelled:
        log.info("reaped", extra={"report": report.__dict__})
    return report


def _waiting_in_broker(queue: _Enqueuer) -> set[str] | None:
    """Job ids the broker still holds, when the queue can tell (the workers' `BrokerJobQueue`).

    None = unknown: then every stale queued job is re-sent (duplicates are harmless, one claim wins)."""
    probe = getattr(queue, "waiting_job_ids", None)
    if probe is None:
        return None
    try:
        return set(probe())
    except Exception:
        log.exception("could not list the jobs waiting in the broker; re-sending every stale queued job")
        return None


def _guarded(session: Session, job: Job, now: datetime, **values: object) -> bool:
    """Update only if the job is still in the state we read (same status, same lease owner)."""
    owner = Job.lease_owner.is_(None) if job.lease_owner is None else Job.lease_owner == job.lease_owner
    stmt = (
        update(Job)
        .where(Job.id == job.id, Job.status == job.status, owner)
        .values(updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(session.execute(stmt).rowcount == 1)  # type: ignore[attr-defined]


def _reap_orphan(session: Session, job: Job, now: datetime, report: ReapReport, to_send: list[str]) -> None:
    who = job.lease_owner or "unknown worker"
    if job.status == JobStatus.CANCELLING:
        if _guarded(session, job, now, status=JobStatus.CANCELLED, finished_at=now, lease_expires_at=None):
            JobEventRepository.add(
                session, job, "state", f"cancelled ({who} is gone)", {"status": JobStatus.CANCELLED}
            )
            report.cancelled.append(job.id)
    elif job.attempts >= job.max_attempts:
        error = {
            "code": "worker_lost",
            "message": f"{who} stopped renewing its lease during attempt {job.attempts} "
            f"of {job.max_attempts}",
        }
        if _guarded(
            session, job, now, status=JobStatus.FAILED, error=error, finished_at=now, lease_expires_at=None
        ):
            JobEventRepository.add(
                session, job, "state", error["message"], {"status": JobStatus.FAILED}, level="error"
            )
            report.failed.append(job.id)
    else:
        # A job that died while validating is validated again by its next claimer.
        status = JobStatus.VALIDATING if job.status == JobStatus.VALIDATING else JobStatus.QUEUED
        if not _guarded(
            session, job, now, status=status, lease_owner=None, lease_expires_at=None, enqueued_at=now
        ):
            return
        JobEventRepository.add(
            session,
            job,
            "state",
            f"{who} stopped renewing its lease during attempt {job.attempts}; queued again",
            {"status": status, "previous_owner": job.lease_owner},
            level="warning",
        )
        report.requeued.append(job.id)
        to_send.append(job.id)


def _resend_stale(
    session: Session, job: Job, now: datetime, settings: Settings, report: ReapReport, to_send: list[str]
) -> None:
    if job.requeues >= settings.max_requeues:
        error = {
            "code": "not_picked_up",
            "message": f"no worker took the job after {job.requeues} re-sends "
            "(is a worker consuming the queue?)",
        }
        if _guarded(session, job, now, status=JobStatus.FAILED, error=error, finished_at=now):
            JobEventRepository.add(
                session, job, "state", error["message"], {"status": JobStatus.FAILED}, level="error"
            )
            report.failed.append(job.id)
    elif _guarded(session, job, now, requeues=job.requeues + 1, enqueued_at=now):
        JobEventRepository.add(
            session,
            job,
            "log",
            "queued but not claimed for a while; sent to the broker again",
            {"requeues": job.requeues + 1},
        )
        report.resent.append(job.id)
        to_send.append(job.id)
