"""Celery settings for actprompt workers, each with the reason it has its value.

The database is the source of truth for every job (status, lease, attempts, checkpoints); the broker only
carries "job X may be worth looking at" nudges. Every setting below follows from that and from the shape of
the work: few, long (minutes to hours), GPU-bound tasks that must never be lost and must never run twice at
the same time.

Built from `service.settings.Settings` by `build_config`, never read from the environment here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from service.settings import Settings
from workers.queues import MAINTENANCE_QUEUE, REAP_TASK, train_queue

#: The longest training job a deployment plans for (a day on one GPU). A longer one still runs to the end;
#: only its message may be handed out again, which its lease refuses.
LONGEST_JOB_SECONDS = 24 * 3600
#: The broker redelivers an unacknowledged message only after this long. It must exceed the longest job
#: (here by a factor of two): a message that comes back while its job still runs would only be refused by
#: the lease (harmless), but the redelivery is useless traffic. Crash recovery does NOT wait for it: the
#: reaper re-queues a job as soon as its lease expires (`Settings.lease_seconds`), so this is only the last
#: line of defence.
VISIBILITY_TIMEOUT_SECONDS = 2 * LONGEST_JOB_SECONDS


def build_config(settings: Settings, *, maintenance_queue: str = MAINTENANCE_QUEUE) -> dict[str, Any]:
    """The Celery configuration (`app.conf.update(**build_config(settings))`).

    Args:
        settings: the process settings (broker URL, reaper interval, training queue).
        maintenance_queue: the queue the reaper's periodic task goes to (a test isolates it per run).

    Returns:
        A mapping of lower-case Celery setting names to values.
    """
    reap_every = max(1.0, float(settings.reaper_interval_seconds))
    return {
        # --- broker ---------------------------------------------------------------------------------
        "broker_url": settings.broker_url,
        "broker_transport_options": {
            # See VISIBILITY_TIMEOUT_SECONDS: longer than any job, so a running job is not handed out twice.
            "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
        },
        # The worker may start before Redis in compose; keep retrying instead of exiting (and silence the
        # Celery 6 deprecation warning about the default).
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # --- results: none. The job row holds status, metrics and the prompt; a result backend would be a
        # second, weaker copy of the truth.
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # --- delivery guarantees ----------------------------------------------------------------------
        # Ack only after run_job returns: a worker that dies mid-training leaves the message unacked, and the
        # job's lease (not the message) decides who may run it next.
        "task_acks_late": True,
        # With acks_late, a task whose worker process is killed is requeued rather than acked as failed
        # (applies to pools with child processes; the solo pool dies with the task, same outcome).
        "task_reject_on_worker_lost": True,
        # One reserved message per worker: a worker busy for an hour must not sit on jobs another idle
        # worker could start now.
        "worker_prefetch_multiplier": 1,
        # A Redis hiccup must not abort an hour of training: the task keeps running, its lease in PostgreSQL
        # stays renewed, and a later redelivery of its message is refused by the job's status.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # --- pool -------------------------------------------------------------------------------------
        # One training task per GPU, in the worker's own process: the solo pool never forks, so CUDA is
        # initialised in exactly one process (fork after CUDA init breaks it). `actprompt worker
        # --concurrency N` (CPU workers only) switches to the prefork pool, whose children are forked at
        # start, before any job, and each hold their own backbone (a backbone serves one caller at a time).
        "worker_pool": "solo",
        "worker_concurrency": 1,
        # --- serialisation: JSON only; a task takes one job id, nothing else crosses the broker.
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # --- routing ----------------------------------------------------------------------------------
        # Training tasks are sent with an explicit queue by the gateway; anything unrouted lands on the
        # training queue of this worker's device kind rather than on Celery's default "celery" queue.
        "task_default_queue": train_queue(settings),
        "task_create_missing_queues": True,
        "task_routes": {REAP_TASK: {"queue": maintenance_queue}},
        # No time limits: the job's own cancel flag stops training cooperatively; a hard kill mid-step would
        # only leave a stale lease for the reaper.
        "task_time_limit": None,
        "task_soft_time_limit": None,
        # --- observability: our structured logs and job events are the record; keep the root logger ours.
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        # --- periodic work ----------------------------------------------------------------------------
        "beat_schedule": {
            REAP_TASK: {
                "task": REAP_TASK,
                "schedule": timedelta(seconds=reap_every),
                # A reap message older than one interval is superseded by the next one; without expiry a
                # busy maintenance worker would run a backlog of identical sweeps.
                "options": {"queue": maintenance_queue, "expires": reap_every},
            }
        },
        # Beat keeps its schedule in memory (the base Scheduler, no shelve file to mount or corrupt): every
        # sweep is idempotent, so a restart that forgets when the last one ran costs nothing.
        "beat_scheduler": "celery.beat:Scheduler",
        "beat_max_loop_interval": min(5.0, reap_every),
    }
