"""`actprompt serve`: one engine process per device, N HTTP front processes, and the supervisor of both.

The parent starts the engine (:func:`service.launch.engine.engine_main`) in a spawned process and runs the
fronts with uvicorn (``workers`` processes on one listening socket;
uvicorn's own supervisor restarts a front that dies while the others keep serving). A thread of the parent
watches the engine: when it dies, fronts already answer 503 (their connection reports the loss), and the
thread starts a new one at once (forked from a fork server that holds the imports, so a restart costs
no import time) and logs how long recovery took. Shutdown runs in the order that drains:
the fronts stop taking connections and finish their requests (which the engine still answers), then the
engine gets SIGTERM and finishes what is left.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import threading
import time
from typing import Any

log = logging.getLogger("actprompt.serve")

#: What the fork server imports once for every engine it forks (what engine_main would import itself).
_ENGINE_PRELOAD = [
    "torch",
    "timm",
    "service.engine",
    "service.db.session",
    "service.launch.engine",
    "service.launch.front",
    "service.serving.core",
    "service.serving.engine_server",
]

__all__ = ["EngineSupervisor", "run"]


class EngineSupervisor:
    """Keeps one engine process alive on ``endpoint``: starts it, restarts it when it dies."""

    def __init__(self, endpoint: str, *, torch_threads: int = 0) -> None:
        self.endpoint = endpoint
        self.torch_threads = torch_threads
        self.restarts = 0
        self.process: Any = None
        # A restarted engine must not pay Python's and torch's imports again (a minute on a loaded host):
        # engines fork from a fork server that imported them once, before any torch thread exists.
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(_ENGINE_PRELOAD)
        self._stop = threading.Event()
        self._first_ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the first engine process bound its socket within ``timeout_s``."""
        return self._first_ready.wait(timeout_s)

    def _run(self) -> None:
        died_at: float | None = None
        fast_deaths = 0
        while not self._stop.is_set():
            ready = self._mp.Event()
            proc = self._mp.Process(
                target=_engine_main,
                args=(self.endpoint, ready, self.torch_threads, os.getpid()),
                name="actprompt-engine",
            )
            started = time.monotonic()
            proc.start()
            self.process = proc
            while not ready.wait(0.1):
                if not proc.is_alive() or self._stop.is_set():
                    break
            if ready.is_set():
                if died_at is not None:
                    log.warning(
                        "engine process %d ready: recovered %.2f s after the previous one died",
                        proc.pid,
                        time.monotonic() - died_at,
                    )
                self._first_ready.set()
            proc.join()
            _forget_metrics_of(proc.pid)
            if self._stop.is_set():
                return
            died_at = time.monotonic()
            self.restarts += 1
            log.error("engine process %d exited with code %s; restarting it", proc.pid, proc.exitcode)
            fast_deaths = fast_deaths + 1 if died_at - started < 10 else 0
            if fast_deaths:  # crash-looping (a bad setting, an unreachable database): back off, up to 10 s
                self._stop.wait(min(10.0, 0.5 * 2**fast_deaths))

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM: the engine answers what it has in flight, then exits (killed after ``timeout_s``)."""
        self._stop.set()
        proc = self.process
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(timeout_s)
            if proc.is_alive():
                log.error("engine process %d did not stop in %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.join()
        self._thread.join(timeout_s)


def _engine_main(endpoint: str, ready: Any, torch_threads: int, supervisor_pid: int) -> None:
    """The engine's entry, imported only in the engine (the parent stays free of torch)."""
    from service.launch.engine import engine_main

    engine_main(endpoint, ready, torch_threads, supervisor_pid)


def _forget_metrics_of(pid: int | None) -> None:
    """A dead process's live gauges (the backbones it held) leave /metrics with it."""
    if pid is not None and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def prepare_environment(workers: int) -> str:
    """Environment every process of this server inherits (call before prometheus_client is imported):
    the shared metrics folder and the engine's endpoint. Returns the endpoint."""
    run_dir = tempfile.mkdtemp(prefix="actprompt-serve-")
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(run_dir, "metrics"))
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    endpoint = f"ipc://{run_dir}/engine.sock"
    os.environ["ACTPROMPT_SERVING_ENGINE_ENDPOINT"] = endpoint
    return endpoint


def run(
    endpoint: str, *, host: str, port: int, workers: int, engine_threads: int, options: dict[str, Any]
) -> int:
    """The engine and the fronts start side by side (both spend most of their start-up importing torch);
    a front's start-up waits for the engine's first answer. Runs until a signal stops the fronts."""
    import uvicorn

    supervisor = EngineSupervisor(endpoint, torch_threads=engine_threads)
    supervisor.start()
    try:
        uvicorn.run(
            "service.api.main:create_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            **options,
        )
    finally:
        supervisor.stop()
    return 0
