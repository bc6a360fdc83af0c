"""`actprompt.train_prompt`: run one training job by id, with the same job runner as the embedded mode.

Everything that makes a delivery safe lives in `service.domain.job_runner.run_job`: it claims the job by a
conditional update (status queued, or a lease that has expired), so a second delivery while the lease is
alive, or a delivery of a job that already finished or was cancelled, does nothing and returns.
"""

from __future__ import annotations

import logging

from celery import Task

from workers import celery_app
from workers.celery_app import app
from workers.celeryconfig import TRAIN_TASK

logger = logging.getLogger(__name__)


@app.task(name=TRAIN_TASK, bind=True, ignore_result=True)
def train_prompt(self: Task, job_id: str) -> None:
    """Run job `job_id` (the message carries nothing else: the database row is the truth)."""
    from service.domain.job_runner import run_job

    worker = celery_app.worker_id(self.request.hostname)
    logger.info("train task received", extra={"job_id": job_id, "worker_id": worker})
    run_job(
        job_id,
        session_factory=celery_app.session_factory(),
        worker_id=worker,
        settings=celery_app.worker_settings(),
    )
