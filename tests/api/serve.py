"""Real servers for end-to-end tests: an `actprompt serve` subprocess (embedded mode, SQLite, a temporary
var dir), or an app under a real uvicorn in a thread of the test process (real sockets, in-process state)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app: Any, **options: Any) -> Iterator[int]:
    """`app` under a real uvicorn (HTTP/1.1 keep-alive, pipelining, disconnects) in a daemon thread, with
    uvicorn's ``options``; yields its port once it serves, and stops it on exit."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", **options))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert srv.started
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def run_server(tmp_path: Path, **env_overrides: str) -> Iterator[tuple[str, str, Path]]:
    """`actprompt serve` on a free port; yields (url, admin key, data root).

    Embedded mode (SQLite under tmp_path, in-process jobs) unless `env_overrides` name a database, a broker
    or an admin key: they are applied last.
    """
    data_root = tmp_path / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "ACTPROMPT_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'actprompt.db'}",
        "ACTPROMPT_VAR_DIR": str(tmp_path / "var"),
        "ACTPROMPT_DATA_ROOTS": str(data_root),
        "ACTPROMPT_DEVICE": "cpu",
        "ACTPROMPT_PROGRESS_EVENT_SECONDS": "1",
    }
    for name in ("ACTPROMPT_ADMIN_KEY", "ACTPROMPT_BROKER_URL"):
        env.pop(name, None)
    env.update(env_overrides)
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "actprompt"), "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # an engine and a front per core import torch (loaded CI hosts)
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("server did not come up: " + (tmp_path / "serve.log").read_text())
        printed = (tmp_path / "serve.log").read_text()
        match = re.search(r"admin key: (\S+)", printed)
        assert match, printed
        assert url in printed and "curl" in printed  # the walkthrough
        yield url, match.group(1), data_root
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
