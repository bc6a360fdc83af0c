"""`actprompt.reap_jobs`: the periodic sweep that makes the database, not the broker, the source of truth.

Sent by beat every `Settings.reaper_interval_seconds` (`actprompt worker --beat`). Re-queues jobs whose
lease expired (their worker died) and jobs that sit `queued` but are missing from the broker (Redis lost
them), and fails jobs out of attempts: `service.domain.reaper.reap` decides; this module supplies its inputs.
"""

from __future__ import annotations

import logging

from workers import celery_app
from workers.celery_app import app
from workers.queues import REAP_TASK

logger = logging.getLogger("actprompt.workers.maintenance")


@app.task(name=REAP_TASK, ignore_result=True)
def reap_jobs() -> dict[str, list[str]]:
    """One sweep; the queue it gets can tell which jobs still wait in Redis (`BrokerJobQueue`)."""
    from service.domain.reaper import reap

    report = reap(celery_app.session_factory(), celery_app.job_queue(), celery_app.worker_settings())
    return dict(report.__dict__)
