"""Start a Celery worker in this process: the one bootstrap behind `actprompt worker`.

By default the worker runs the solo pool: one training task at a time, in this process, so CUDA is
initialised in exactly one process and nothing forks after it. `concurrency` > 1 (CPU workers only)
switches to the prefork pool: N child processes, forked before any job runs (a loaded backbone serves one
caller at a time, so N jobs need N processes, not N threads). `beat` also runs the reaper's schedule in a
thread and consumes the maintenance queue.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings
from workers.queues import MAINTENANCE_QUEUE, train_queue

logger = logging.getLogger("actprompt.worker")


class WorkerConfigError(Exception):
    """The worker cannot start with these settings or options (the message says why)."""


@dataclass(frozen=True)
class WorkerOptions:
    """What one worker process does, beyond the settings (the command line's options)."""

    queues: str | None = None  # comma-separated; None = the training queue of the device kind
    concurrency: int = 1
    beat: bool = False
    maintenance_queue: str = MAINTENANCE_QUEUE
    hostname: str | None = None
    loglevel: str | None = None
    health_file: Path | None = None


def _touch_forever(path: Path, every: float = 5.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path.touch()
        time.sleep(every)


def _configure_logging(level: str, json_lines: bool) -> None:
    from service.log import configure_logging

    configure_logging(level, json_lines=json_lines)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the start-up schema check is not news


def consumed_queues(settings: Settings, options: WorkerOptions) -> list[str]:
    """The queues this worker consumes: the asked ones (or the device's), plus maintenance with beat."""
    queues = [q.strip() for q in (options.queues or train_queue(settings)).split(",") if q.strip()]
    if options.beat and options.maintenance_queue not in queues:
        queues.append(options.maintenance_queue)
    return queues


def run_worker(settings: Settings, options: WorkerOptions) -> int:
    """Configure the Celery app from `settings` and `options`, run the worker until it stops.

    Raises:
        WorkerConfigError: no broker, several tasks at once on a GPU, or an unmigrated database; checked
            before anything starts, so a misconfigured worker fails at start rather than at its first job.

    Returns:
        The worker's exit code.
    """
    if not settings.broker_url:
        raise WorkerConfigError("needs ACTPROMPT_BROKER_URL (e.g. redis://localhost:6379/0)")
    concurrency = max(1, int(options.concurrency))
    if concurrency > 1 and settings.resolved_device() == "cuda":
        raise WorkerConfigError("one training task per GPU; run one worker per GPU instead of --concurrency")
    pool = "solo" if concurrency == 1 else "prefork"
    loglevel = options.loglevel or settings.log_level
    _configure_logging(loglevel, settings.log_json)

    from service.db.migrate import DatabaseNotMigrated, check_migrated_url
    from workers import celery_app

    app = celery_app.configure(settings, maintenance_queue=options.maintenance_queue)
    try:
        check_migrated_url(settings.database_url)
    except DatabaseNotMigrated as exc:
        raise WorkerConfigError(str(exc)) from exc
    queues = consumed_queues(settings, options)
    hostname = options.hostname or f"actprompt@{socket.gethostname()}.{os.getpid()}"

    if options.health_file is not None:
        threading.Thread(
            target=_touch_forever, args=(options.health_file,), name="health-file", daemon=True
        ).start()

    if any(q != options.maintenance_queue for q in queues):
        # A training worker imports the job runner and the engine (torch, timm) now, not inside its first
        # job: a broken install fails at start, and the first job (or a resumed one) starts training at once.
        for module in ("service.domain.job_runner", "service.engine", "service.engine.train"):
            importlib.import_module(module)

    beat = None
    if options.beat:
        from celery.beat import EmbeddedService

        # A thread, not Celery's default child process: no fork in a process that may initialise CUDA, and
        # the schedule dies with the worker instead of outliving a SIGKILL.
        # celery.beat.Service defaults to the shelve-backed PersistentScheduler whatever the config says;
        # pass ours (in-memory, see celeryconfig) so no schedule file lands in the working directory.
        beat = EmbeddedService(app, thread=True, scheduler_cls=app.conf.beat_scheduler)
        beat.start()

    logger.info(
        "worker starting",
        extra={
            "hostname": hostname,
            "queues": queues,
            "device": settings.device,
            "pool": pool,
            "concurrency": concurrency,
            "beat": options.beat,
        },
    )
    worker = app.Worker(
        hostname=hostname,
        queues=queues,
        pool_cls=pool,
        concurrency=concurrency,
        loglevel=loglevel.upper(),
        # The database, not the cluster, coordinates the workers: no gossip, mingle or event heartbeats.
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=True,
    )
    try:
        worker.start()
    finally:
        if beat is not None:
            beat.stop()
    exitcode = worker.exitcode
    return int(exitcode) if isinstance(exitcode, int) else 0
