"""The Celery configuration and the `actprompt worker` command, without a running worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.app.defaults import NAMESPACES, flatten
from celery.concurrency import get_implementation
from celery.concurrency.solo import TaskPool as InProcessPool

from service.cli import build_parser
from service.queue import CeleryQueue
from service.settings import Settings
from workers.celeryconfig import LONGEST_JOB_SECONDS, build_config
from workers.queues import REAP_TASK, train_queue

ACTPROMPT = str(Path(sys.executable).with_name("actprompt"))

#: Values unlike any default, so that a test passes only if the setting is really carried through.
REAP_EVERY = 17.5
MAINTENANCE = "maintenance-under-test"


def _applied(settings: Settings) -> Celery:
    """A Celery app configured as a worker would be: what Celery reads, not the dict we wrote."""
    app = Celery("config-under-test", set_as_current=False)
    app.conf.update(build_config(settings, maintenance_queue=MAINTENANCE))
    return app


@pytest.fixture
def gpu_settings() -> Settings:
    return Settings(broker_url="redis://localhost:6379/0", device="cuda", reaper_interval_seconds=REAP_EVERY)


def test_every_key_is_a_celery_setting(gpu_settings: Settings) -> None:
    """Celery ignores a misspelt key without a word: `task_ack_late` would silently mean acks early."""
    known = {name for name, _ in flatten(NAMESPACES)}
    assert set(build_config(gpu_settings)) - known == set()


def test_a_killed_workers_task_is_redelivered(gpu_settings: Settings) -> None:
    """Acked only after the job returns, and requeued (not acked as failed) when its worker dies."""
    conf = _applied(gpu_settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert not conf.worker_cancel_long_running_tasks_on_connection_loss  # a Redis hiccup keeps training


def test_a_busy_worker_holds_no_second_message(gpu_settings: Settings) -> None:
    """Celery reserves prefetch multiplier x concurrency messages; any beyond the tasks running at once
    would wait behind an hour of training while another worker idles."""
    conf = _applied(gpu_settings).conf
    assert conf.worker_prefetch_multiplier * conf.worker_concurrency == conf.worker_concurrency


def test_training_runs_in_the_workers_own_process(gpu_settings: Settings) -> None:
    """CUDA breaks in a process forked after it was initialised: one in-process task per GPU."""
    conf = _applied(gpu_settings).conf
    assert issubclass(get_implementation(conf.worker_pool), InProcessPool) and conf.worker_concurrency == 1


def test_the_broker_does_not_hand_out_a_running_job_again() -> None:
    """Redelivery waits longer than the longest planned job and than the crash recovery the reaper does
    (lease plus one sweep), even with a long lease."""
    settings = Settings(broker_url="redis://localhost:6379/0", lease_seconds=3600, heartbeat_seconds=60)
    timeout = _applied(settings).conf.broker_transport_options["visibility_timeout"]
    assert timeout > LONGEST_JOB_SECONDS
    assert timeout > settings.lease_seconds + settings.reaper_interval_seconds


def test_the_reaper_sweeps_at_the_set_interval_on_its_own_queue(gpu_settings: Settings) -> None:
    conf = _applied(gpu_settings).conf
    [entry] = conf.beat_schedule.values()
    assert entry["task"] == REAP_TASK
    assert entry["schedule"].total_seconds() == gpu_settings.reaper_interval_seconds
    # a sweep not run within one interval is superseded by the next: no backlog of identical sweeps
    assert entry["options"]["expires"] <= gpu_settings.reaper_interval_seconds
    assert entry["options"]["queue"] == MAINTENANCE
    assert conf.task_routes[REAP_TASK]["queue"] == MAINTENANCE != conf.task_default_queue


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_workers_consume_what_the_gateway_sends(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task name and queue the gateway publishes are a task the worker registers, on the queue a
    worker of that device kind consumes; CPU and GPU workers never take each other's jobs."""
    from workers.celery_app import app

    settings = Settings(broker_url="redis://localhost:6379/0", device=device)
    sent: list[tuple[str, dict[str, Any]]] = []
    gateway = CeleryQueue(settings.broker_url, train_queue(settings))
    monkeypatch.setattr(gateway._app, "send_task", lambda name, **kw: sent.append((name, kw)))
    gateway.enqueue("job_1")
    [(name, options)] = sent
    app.loader.import_default_modules()
    assert name in app.tasks and REAP_TASK in app.tasks
    assert options["queue"] == _applied(settings).conf.task_default_queue
    other = "cpu" if device == "cuda" else "cuda"
    assert options["queue"] != _applied(Settings(device=other)).conf.task_default_queue


def test_beat_keeps_no_schedule_file(gpu_settings: Settings) -> None:
    """Every sweep is idempotent: a restart that forgets the last run costs nothing; a shelve file is one
    more thing to mount and corrupt."""
    from celery.beat import PersistentScheduler, Scheduler
    from celery.utils.imports import symbol_by_name

    scheduler = symbol_by_name(_applied(gpu_settings).conf.beat_scheduler)
    assert issubclass(scheduler, Scheduler) and not issubclass(scheduler, PersistentScheduler)


def test_worker_command_options() -> None:
    args = build_parser().parse_args(["worker", "--device", "cpu", "-Q", "a,b", "-c", "2", "--beat"])
    assert (args.device, args.queues, args.concurrency, args.beat) == ("cpu", "a,b", 2, True)
    defaults = build_parser().parse_args(["worker"])
    assert (defaults.device, defaults.queues, defaults.concurrency, defaults.beat) == (None, None, 1, False)


def _run_worker(
    env_updates: dict[str, str], tmp_path: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTPROMPT_")}
    env.update(env_updates)
    return subprocess.run(
        [ACTPROMPT, "worker", *(options or ("--device", "cpu"))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_worker_refuses_to_start_without_a_broker(tmp_path: Path) -> None:
    result = _run_worker({}, tmp_path)
    assert result.returncode == 2 and "ACTPROMPT_BROKER_URL" in result.stderr


def test_worker_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    result = _run_worker(
        {
            "ACTPROMPT_BROKER_URL": "redis://127.0.0.1:6379/5",
            "ACTPROMPT_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        },
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "actprompt db upgrade" in result.stderr


def test_worker_refuses_several_tasks_per_gpu(tmp_path: Path) -> None:
    result = _run_worker(
        {"ACTPROMPT_BROKER_URL": "redis://127.0.0.1:6379/5"}, tmp_path, "--device", "cuda", "-c", "2"
    )
    assert result.returncode == 2 and "one training task per GPU" in result.stderr
