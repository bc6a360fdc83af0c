"""`actprompt worker`: a Celery worker for training jobs, started in this process.

    actprompt worker [--device cpu|cuda|auto] [--queues Q1,Q2] [--concurrency N] [--beat]

Production mode needs ACTPROMPT_BROKER_URL (redis://...) and ACTPROMPT_DATABASE_URL (postgresql+psycopg://...).
By default the worker runs the solo pool: one training task at a time, in this process, so CUDA is initialised
in exactly one process and nothing forks after it. `--concurrency N` > 1 (CPU workers only) switches to the
prefork pool: N child processes, forked before any job runs (a loaded backbone serves one caller at a time,
so N jobs need N processes, not N threads). `--beat` also runs the reaper's schedule in a thread and
consumes the maintenance queue.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger("actprompt.worker")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run a Celery worker that trains queued jobs (production mode)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="where training runs (default: ACTPROMPT_DEVICE); also picks the default queue",
    )
    parser.add_argument(
        "--queues",
        "-Q",
        default=None,
        help="comma-separated queues to consume (default: the training queue of the device kind, "
        "actprompt.gpu or actprompt.cpu, or ACTPROMPT_JOB_QUEUE)",
    )
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=1,
        help="training tasks at once; 1 = solo pool (the only choice on a GPU: run one worker per GPU), "
        "N > 1 = prefork pool of N processes (CPU workers)",
    )
    parser.add_argument(
        "--beat",
        action="store_true",
        help="also run the reaper's periodic schedule (in a thread) and consume the maintenance queue; "
        "run exactly one such worker per deployment",
    )
    parser.add_argument(
        "--maintenance-queue",
        default=None,
        help="queue of the reaper's periodic task (default actprompt.maintenance)",
    )
    parser.add_argument(
        "--hostname", "-n", default=None, help="Celery node name (default actprompt@HOST.PID)"
    )
    parser.add_argument("--loglevel", "-l", default=None, help="log level (default: ACTPROMPT_LOG_LEVEL)")
    parser.add_argument(
        "--health-file",
        type=Path,
        default=None,
        help="touch this file every few seconds while the process lives (container liveness check)",
    )
    parser.set_defaults(func=run_worker)


def _configure_logging(level: str, json_lines: bool) -> None:
    from service.log import configure_logging

    configure_logging(level, json_lines=json_lines)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the start-up schema check is not news


def _touch_forever(path: Path, every: float = 5.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path.touch()
        time.sleep(every)


def run_worker(args: argparse.Namespace) -> int:
    """Configure the Celery app from the settings plus these options and run the worker until it stops."""
    from service.settings import get_settings

    settings = get_settings()
    if args.device is not None:
        settings = settings.model_copy(update={"device": args.device})
    if not settings.broker_url:
        print("actprompt worker needs ACTPROMPT_BROKER_URL (e.g. redis://localhost:6379/0)", file=sys.stderr)
        return 2
    concurrency = max(1, int(args.concurrency))
    if concurrency > 1 and settings.resolved_device() == "cuda":
        print(
            "actprompt worker: one training task per GPU; run one worker per GPU instead of --concurrency",
            file=sys.stderr,
        )
        return 2
    pool = "solo" if concurrency == 1 else "prefork"
    _configure_logging(args.loglevel or settings.log_level, settings.log_json)

    from service.db.migrate import DatabaseNotMigrated, check_migrated_url
    from workers import celery_app
    from workers.celeryconfig import MAINTENANCE_QUEUE

    maintenance_queue = args.maintenance_queue or MAINTENANCE_QUEUE
    app = celery_app.configure(settings, maintenance_queue=maintenance_queue)
    # Fail at start, not at the first job, on a database the migrations have not reached.
    try:
        check_migrated_url(settings.database_url)
    except DatabaseNotMigrated as exc:
        print(f"actprompt worker: {exc}", file=sys.stderr)
        return 2
    queues = [q.strip() for q in (args.queues or settings.train_queue()).split(",") if q.strip()]
    if args.beat and maintenance_queue not in queues:
        queues.append(maintenance_queue)
    hostname = args.hostname or f"actprompt@{socket.gethostname()}.{os.getpid()}"

    if args.health_file is not None:
        threading.Thread(
            target=_touch_forever, args=(args.health_file,), name="health-file", daemon=True
        ).start()

    if any(q != maintenance_queue for q in queues):
        # A training worker imports the job runner and the engine (torch, timm) now, not inside its first
        # job: a broken install fails at start, and the first job (or a resumed one) starts training at once.
        for module in ("service.domain.job_runner", "service.engine", "service.engine.train"):
            importlib.import_module(module)

    beat = None
    if args.beat:
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
            "beat": bool(args.beat),
        },
    )
    worker = app.Worker(
        hostname=hostname,
        queues=queues,
        pool_cls=pool,
        concurrency=concurrency,
        loglevel=(args.loglevel or settings.log_level).upper(),
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
