"""The HTTP benchmark keeps the log of a server that died under it (its folder is removed on stop)."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.serving_http import Server


def test_a_server_that_exited_on_its_own_leaves_its_log(tmp_path: Path) -> None:
    script = "import sys; print('supervisor gave up', flush=True); sys.exit(3)"
    server = Server(command=[sys.executable, "-c", script])
    server.proc.wait(timeout=60)
    kept = server.stop(keep_log_in=tmp_path)
    assert kept is not None and kept.parent == tmp_path and "rc3" in kept.name
    assert "supervisor gave up" in kept.read_text()
    assert not server.tmp.exists()


def test_a_server_stopped_while_running_keeps_nothing(tmp_path: Path) -> None:
    server = Server(command=[sys.executable, "-c", "import time; time.sleep(60)"])
    assert server.stop(keep_log_in=tmp_path) is None
    assert list(tmp_path.iterdir()) == [] and not server.tmp.exists()
