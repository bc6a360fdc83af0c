"""`actprompt worker`: a Celery worker for training jobs, started in this process.

    actprompt worker [--device cpu|cuda|auto] [--queues Q1,Q2] [--concurrency N] [--beat]

Production mode needs ACTPROMPT_BROKER_URL (redis://...) and ACTPROMPT_DATABASE_URL (postgresql+psycopg://...).
By default the worker runs the solo pool: one training task at a time, in this process, so CUDA is initialised
in exactly one process and nothing forks after it. `--concurrency N` > 1 (CPU workers only) switches to the
prefork pool: N child processes, forked before any job runs. `--beat` also runs the reaper's schedule in a
thread and consumes the maintenance queue. The start-up itself lives in `workers.start`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


def run_worker(args: argparse.Namespace) -> int:
    """Start a worker (`workers.start.run_worker`) with the settings plus these options."""
    from service.settings import get_settings
    from workers.queues import MAINTENANCE_QUEUE
    from workers.start import WorkerConfigError, WorkerOptions
    from workers.start import run_worker as start_worker

    settings = get_settings()
    if args.device is not None:
        settings = settings.model_copy(update={"device": args.device})
    options = WorkerOptions(
        queues=args.queues,
        concurrency=args.concurrency,
        beat=args.beat,
        hostname=args.hostname,
        loglevel=args.loglevel,
        health_file=args.health_file,
        maintenance_queue=args.maintenance_queue or MAINTENANCE_QUEUE,
    )
    try:
        return start_worker(settings, options)
    except WorkerConfigError as exc:
        print(f"actprompt worker: {exc}", file=sys.stderr)
        return 2
