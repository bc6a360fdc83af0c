"""The lease a worker holds on one job while it runs it: heartbeat, stop flags, and owned writes.

Every write after the claim is conditioned on still owning the lease, so a worker that lost its job
(its lease expired and someone else took it) cannot overwrite the new owner's state.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from types import TracebackType
from typing import Any

from actprompt.states import JobStatus
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.db.repositories import JobEventRepository, JobLeaseRepository
from service.settings import Settings

log = logging.getLogger("actprompt.job_lease")


class LeaseStop(Exception):
    """Stop between steps (cancel requested, lease lost or process shutdown noticed)."""


class JobLease:
    """Context manager: a heartbeat thread renews the lease and notices a cancel while the block runs."""

    def __init__(
        self,
        job_id: str,
        session_factory: sessionmaker[Session],
        worker_id: str,
        settings: Settings,
        shutdown: threading.Event | None = None,
    ) -> None:
        self.job_id = job_id
        self.session_factory = session_factory
        self.worker_id = worker_id
        self.settings = settings
        self.shutdown = shutdown or threading.Event()
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> JobLease:
        self._thread = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _heartbeat(self) -> None:
        interval = max(0.05, min(self.settings.cancel_poll_seconds, self.settings.heartbeat_seconds))
        last_renew = time.monotonic()
        while not self._stop.wait(interval):
            try:
                with self.session_factory() as session:
                    lease = JobLeaseRepository(session)
                    if time.monotonic() - last_renew >= self.settings.heartbeat_seconds:
                        now = utcnow()
                        until = now + timedelta(seconds=self.settings.lease_seconds)
                        if not lease.renew(self.job_id, self.worker_id, now, until):
                            self.lost.set()
                        session.commit()
                        last_renew = time.monotonic()
                    status = lease.status_if_owner(self.job_id, self.worker_id)
                    if status is None:
                        self.lost.set()
                    elif status == JobStatus.CANCELLING:
                        self.cancel_requested.set()
            except Exception:  # a DB hiccup must not kill the heartbeat; the next tick retries
                log.exception("heartbeat failed", extra={"job_id": self.job_id})

    # --- flags ----------------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lost.is_set() or self.shutdown.is_set()

    def check_stop(self) -> None:
        if self.should_stop():
            raise LeaseStop()

    def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, the lease kept alive; LeaseStop at once on a cancel, loss or shutdown."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.check_stop()
            self.shutdown.wait(min(left, 0.2))
        self.check_stop()

    # --- owned writes ---------------------------------------------------------------------------------
    def write(
        self,
        *,
        event: tuple[str, str, dict[str, Any] | None] | None = None,
        level: str = "info",
        only_if_status: tuple[str, ...] | None = None,
        **values: Any,
    ) -> bool:
        """Update the job (and add an event) only while we own it; False (and `lost`) otherwise.

        `only_if_status`: also require one of these statuses (a transition that must not overwrite a
        cancel that arrived meanwhile); a mismatch returns False without marking the lease lost.
        """
        with self.session_factory() as session:
            lease = JobLeaseRepository(session)
            ok = lease.update_owned(
                self.job_id, self.worker_id, statuses=only_if_status, updated_at=utcnow(), **values
            )
            if not ok:
                session.rollback()
                if only_if_status is None or lease.status_if_owner(self.job_id, self.worker_id) is None:
                    self.lost.set()
                return False
            if event is not None:
                job = lease.get(self.job_id)
                if job is None:  # deleted under us (its tenant went away): nothing left to own
                    session.rollback()
                    self.lost.set()
                    return False
                JobEventRepository.add(session, job, event[0], event[1], event[2], level=level)
            session.commit()
            return True

    def event(
        self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info"
    ) -> None:
        self.write(event=(type_, message, data), level=level)
