"""`actprompt.reap_jobs`: the periodic sweep that makes the database, not the broker, the source of truth.

Sent by beat every `Settings.reaper_interval_seconds` (`actprompt worker --beat`). Re-queues jobs whose
lease expired (their worker died) and jobs that sat `queued` too long (the broker lost the message), and
fails jobs out of attempts: `service.domain.reaper.reap` decides; this module only supplies its inputs.
"""

from __future__ import annotations

import logging

from kombu import Exchange, Queue

from workers import celery_app
from workers.celery_app import app
from workers.celeryconfig import CPU_QUEUE, GPU_QUEUE, REAP_TASK

logger = logging.getLogger(__name__)


def redeclare_queues(queue_names: list[str]) -> None:
    """Re-create the broker's exchange -> queue bindings (a Redis that lost its data lost them too).

    Kombu's Redis transport routes a message through a `_kombu.binding.<exchange>` set; producers declare it
    once per process and cache that, so after a FLUSHALL every send to the queue is silently dropped until
    someone declares it again. Declaring is idempotent, so every sweep does it before re-sending jobs.
    """
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in queue_names:
            Queue(name, Exchange(name, type="direct"), routing_key=name)(channel).declare()


@app.task(name=REAP_TASK, ignore_result=True)
def reap_jobs() -> None:
    """One sweep: restore the broker's routing, then let the domain re-queue or fail lost jobs."""
    from service.domain.reaper import reap

    settings = celery_app.worker_settings()
    redeclare_queues(sorted({GPU_QUEUE, CPU_QUEUE, settings.train_queue(), celery_app.maintenance_queue()}))
    result = reap(celery_app.session_factory(), celery_app.job_queue(), settings)
    logger.info("reaper sweep done", extra={"result": repr(result)})
