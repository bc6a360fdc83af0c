"""`actprompt.train_prompt`: run one training job by id, with the same job runner as the embedded mode.

Everything that makes a delivery safe lives in `service.domain.job_runner.run_job`: it claims the job by a
conditional update (status queued, or a lease that has expired), so a second delivery while the lease is
alive, or a delivery of a job that already finished or was cancelled, does nothing and returns.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Task
from celery.signals import worker_shutting_down

from workers import celery_app
from workers.celery_app import app
from workers.queues import TRAIN_TASK

logger = logging.getLogger("actprompt.workers.train")

#: Set when the worker begins a warm shutdown (SIGTERM, `docker stop`): the running job stops at its next
#: step, gives its attempt back and is sent to the broker again, so another worker resumes it from its last
#: checkpoint instead of waiting for the lease to expire. (Solo pool; prefork children finish their job.)
SHUTDOWN = threading.Event()


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    SHUTDOWN.set()


@app.task(name=TRAIN_TASK, bind=True, ignore_result=True)
def train_prompt(self: Task, job_id: str) -> str:
    """Run job `job_id` (the message carries nothing else: the database row is the truth)."""
    from service.domain.job_runner import RunOutcome, run_job

    worker = celery_app.worker_id(self.request.hostname)
    logger.info("train task received", extra={"job_id": job_id, "worker_id": worker})
    outcome = run_job(
        job_id,
        session_factory=celery_app.session_factory(),
        worker_id=worker,
        settings=celery_app.worker_settings(),
        stop_event=SHUTDOWN,
    )
    if outcome in (RunOutcome.RETRY, RunOutcome.INTERRUPTED):
        # The job is `queued` again in the database; send it now rather than wait for the reaper.
        celery_app.job_queue().enqueue(job_id)
    logger.info("train task done", extra={"job_id": job_id, "worker_id": worker, "outcome": outcome.value})
    return outcome.value
