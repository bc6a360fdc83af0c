"""The Celery configuration and the `actprompt worker` command, without a running worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.cli import build_parser
from service.settings import Settings
from workers.celeryconfig import (
    CPU_QUEUE,
    GPU_QUEUE,
    MAINTENANCE_QUEUE,
    REAP_TASK,
    TRAIN_TASK,
    VISIBILITY_TIMEOUT_SECONDS,
    build_config,
)

ACTPROMPT = str(Path(sys.executable).with_name("actprompt"))


def test_settings_that_long_gpu_jobs_need() -> None:
    settings = Settings(broker_url="redis://localhost:6379/0", device="cuda", reaper_interval_seconds=30)
    conf = build_config(settings)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_pool"] == "solo" and conf["worker_concurrency"] == 1
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    # Longer than any job, and far longer than the lease that crash recovery actually waits for.
    assert conf["broker_transport_options"]["visibility_timeout"] == VISIBILITY_TIMEOUT_SECONDS >= 24 * 3600
    assert 100 * settings.lease_seconds < VISIBILITY_TIMEOUT_SECONDS
    assert conf["task_default_queue"] == GPU_QUEUE
    assert conf["task_routes"] == {REAP_TASK: {"queue": MAINTENANCE_QUEUE}}
    entry = conf["beat_schedule"][REAP_TASK]
    assert entry["task"] == REAP_TASK and entry["schedule"].total_seconds() == 30
    assert entry["options"]["expires"] == 30
    assert conf["beat_scheduler"] == "celery.beat:Scheduler"  # in memory: no schedule file to persist
    assert build_config(Settings(device="cpu"))["task_default_queue"] == CPU_QUEUE


def test_task_names_are_the_ones_the_gateway_sends() -> None:
    from service.queue import TRAIN_TASK as GATEWAY_TRAIN_TASK
    from workers.celery_app import app

    app.loader.import_default_modules()
    assert TRAIN_TASK == GATEWAY_TRAIN_TASK == "actprompt.train_prompt"
    assert REAP_TASK == "actprompt.reap_jobs"
    assert {TRAIN_TASK, REAP_TASK} <= set(app.tasks)


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
