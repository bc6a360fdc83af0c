"""The Celery application of the workers, configured from `service.settings.get_settings()`.

`celery -A workers.celery_app worker` works as is; `actprompt worker` (workers/start.py) calls
`configure()` again with its command-line overrides (device, maintenance queue) before it starts the worker.
The process-wide resources a task needs (settings, the database session factory, the job queue) live here,
built lazily once per process, so task modules stay a few lines long.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING

from celery import Celery

from service.settings import Settings, get_settings
from workers.celeryconfig import build_config
from workers.queues import MAINTENANCE_QUEUE, train_queue

if TYPE_CHECKING:
    from service.db.session import SessionFactory
    from workers.broker import BrokerJobQueue

#: The task modules; importing them registers `actprompt.train_prompt` and `actprompt.reap_jobs`.
TASK_MODULES: tuple[str, ...] = ("workers.tasks.train", "workers.tasks.maintenance")

app = Celery("actprompt", include=list(TASK_MODULES))

_lock = threading.Lock()
_settings: Settings | None = None
_maintenance_queue: str = MAINTENANCE_QUEUE
_session_factory: SessionFactory | None = None
_queue: BrokerJobQueue | None = None


def configure(settings: Settings | None = None, *, maintenance_queue: str = MAINTENANCE_QUEUE) -> Celery:
    """(Re)configure the app from settings; drops the resources built from earlier settings.

    Args:
        settings: defaults to `get_settings()`.
        maintenance_queue: where the reaper's periodic task is sent (and consumed by `--beat` workers).

    Returns:
        The configured module-level app.
    """
    global _settings, _maintenance_queue, _session_factory, _queue
    settings = settings or get_settings()
    with _lock:
        _settings = settings
        _maintenance_queue = maintenance_queue
        _session_factory = None
        _queue = None
        app.conf.update(build_config(settings, maintenance_queue=maintenance_queue))
    return app


def worker_settings() -> Settings:
    """The settings this worker process runs with (after command-line overrides)."""
    return _settings if _settings is not None else get_settings()


def maintenance_queue() -> str:
    return _maintenance_queue


def session_factory() -> SessionFactory:
    """One SQLAlchemy engine + session factory per worker process (the pool is reused across tasks)."""
    global _session_factory
    with _lock:
        if _session_factory is None:
            from service.db.session import make_engine, make_session_factory

            _session_factory = make_session_factory(make_engine(worker_settings().database_url))
        return _session_factory


def job_queue() -> BrokerJobQueue:
    """What the reaper and the task re-send jobs through (the gateway's `CeleryQueue` + a broker lookup)."""
    global _queue
    with _lock:
        if _queue is None:
            from workers.broker import BrokerJobQueue

            settings = worker_settings()
            if not settings.broker_url:
                raise RuntimeError("workers run in production mode only: set ACTPROMPT_BROKER_URL")
            _queue = BrokerJobQueue(settings.broker_url, train_queue(settings))
        return _queue


def worker_id(nodename: str | None) -> str:
    """Who holds a job's lease: the Celery node name plus the process id (unique across restarts)."""
    return f"{nodename or socket.gethostname()}/{os.getpid()}"


# Lazy: evaluated when the configuration is first read (by `celery -A workers.celery_app worker`, or inside
# `configure()`), so importing this module costs nothing and resolving `device=auto` (which imports torch)
# happens only with the settings the process really runs with.
app.add_defaults(lambda: build_config(worker_settings(), maintenance_queue=_maintenance_queue))
