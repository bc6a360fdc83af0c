"""Job queues: the Celery client (sends by task name, never importing the worker application) and the
in-process queue.

Both queues end in the same call, `service.domain.job_runner.run_job`, and both are used only after the
job row is committed.
"""

from __future__ import annotations

import logging
import os
import queue as stdlib_queue
import socket
import threading
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.processes import pid_alive
from service.settings import Settings
from workers.queues import TRAIN_TASK, train_queue

log = logging.getLogger("actprompt.queue")


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...

    def ping(self) -> bool: ...


class CeleryQueue:
    """Sends `TRAIN_TASK` by name to the device-kind queue (`actprompt.gpu` / `actprompt.cpu`)."""

    def __init__(self, broker_url: str, queue_name: str) -> None:
        import celery

        self.queue_name = queue_name
        self._app = celery.Celery("actprompt-gateway", broker=broker_url, set_as_current=False)
        # Publishing must not hang a request for long when the broker is down.
        self._app.conf.broker_connection_timeout = 5
        self._app.conf.broker_transport_options = {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
        }

    def enqueue(self, job_id: str) -> None:
        self._app.send_task(
            TRAIN_TASK,
            args=[job_id],
            queue=self.queue_name,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        )
        log.info("job sent", extra={"job_id": job_id, "queue": self.queue_name})

    def ping(self) -> bool:
        try:
            with self._app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False

    def close(self) -> None:
        self._app.close()


class InProcessQueue:
    """Embedded mode: one worker thread in the gateway runs jobs in order, plus the reaper between jobs.

    At start it takes over every job left `queued`, `running` or `cancelling` by a previous run, without
    waiting for the leases to expire, except the leases of an embedded worker on this host whose process is
    still alive: `serve --workers N` runs one per front, and a front started (or restarted) while another
    runs a job must not run that job a second time.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], settings: Settings, *, run_jobs: bool = True
    ) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.run_jobs = run_jobs
        self.worker_id = embedded_worker_id(os.getpid())
        self._queue: stdlib_queue.Queue[str | None] = stdlib_queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.run_jobs or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="actprompt-embedded-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask a running job to give itself back (it resumes at the next start) and join the thread."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def enqueue(self, job_id: str) -> None:
        if not self.run_jobs:
            return
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def ping(self) -> bool:
        return not self.run_jobs or (self._thread is not None and self._thread.is_alive())

    def _reap(self, *, takeover: bool) -> None:
        from service.domain.reaper import reap

        try:
            reap(
                self.session_factory,
                self,
                self.settings,
                takeover=takeover,
                requeue_stale_queued=False,
                owner_alive=embedded_sibling_alive,
            )
        except Exception:
            log.exception("reaper pass failed")

    def _loop(self) -> None:
        from service.domain.job_runner import RunOutcome, run_job

        self._reap(takeover=True)
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=self.settings.reaper_interval_seconds)
            except stdlib_queue.Empty:
                self._reap(takeover=False)
                continue
            if job_id is None:
                break
            with self._lock:
                self._pending.discard(job_id)
            try:
                outcome: Any = run_job(
                    job_id,
                    session_factory=self.session_factory,
                    worker_id=self.worker_id,
                    settings=self.settings,
                    stop_event=self._stop,
                )
            except Exception:
                log.exception("run_job raised", extra={"job_id": job_id})
                continue
            if outcome == RunOutcome.RETRY:
                self.enqueue(job_id)


def _embedded_prefix() -> str:
    return f"embedded-{socket.gethostname()}-"


def embedded_worker_id(pid: int) -> str:
    """The lease owner an embedded worker writes: its host and process."""
    return f"{_embedded_prefix()}{pid}"


def embedded_sibling_alive(owner: str) -> bool:
    """Whether `owner` is another embedded worker on this host whose process still runs.

    A reused pid reads as alive: that lease then expires as usual, which is safe, only slower.
    """
    prefix = _embedded_prefix()
    pid = owner[len(prefix) :]
    if not owner.startswith(prefix) or not pid.isdigit():
        return False
    if int(pid) == os.getpid():  # a previous run of this very process cannot be running anything now
        return False
    return pid_alive(int(pid))


def create_queue(settings: Settings, session_factory: sessionmaker[Session]) -> CeleryQueue | InProcessQueue:
    """Celery when a broker is configured, else the in-process queue (not started)."""
    if settings.broker_url:
        return CeleryQueue(settings.broker_url, train_queue(settings))
    return InProcessQueue(session_factory, settings, run_jobs=settings.embedded_worker)
