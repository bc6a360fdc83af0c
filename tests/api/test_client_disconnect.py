"""A client that hangs up mid-body is not a server error: no 500 in the request counter, no traceback
logged as an unhandled error, and the server goes on serving (seen under load: a load generator that
stops closes its connections in the middle of uploads)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.main import create_app
from tests.api.conftest import ADMIN_KEY, settings_for
from tests.api.serve import serve_in_thread


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server(sqlite_url: str, data_root: Path, tmp_path: Path) -> Iterator[str]:
    """The app under a real uvicorn in a thread (a disconnect needs a real socket)."""
    settings = settings_for(sqlite_url, data_root, tmp_path, embedded_worker=False, log_level="INFO")
    with serve_in_thread(create_app(settings)) as port:
        yield f"http://127.0.0.1:{port}"


def _statuses(metrics: str, route: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("actprompt_http_requests_total{") and f'route="{route}"' in line:
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_a_client_gone_mid_body_is_counted_as_499_not_as_a_server_error(server: str) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    key = httpx.post(f"{server}/v1/tenants", json={"name": "gone"}, headers=admin).json()["api_key"]
    records = _Records()
    watched = [logging.getLogger(n) for n in ("actprompt", "uvicorn.error")]
    for lg in watched:
        lg.addHandler(records)
    try:
        host, port = server.removeprefix("http://").split(":")
        for _ in range(3):  # headers and half the promised body, then hang up
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n".encode()
                    + b'{"prompt": "prm_x", "images": ["'
                )
                time.sleep(0.2)  # the handler is reading the body when the connection goes
        deadline = time.monotonic() + 10
        counted: dict[str, float] = {}
        while time.monotonic() < deadline:
            counted = _statuses(httpx.get(f"{server}/metrics").text, "/v1/predict")
            if counted.get("499", 0) >= 3:
                break
            time.sleep(0.1)
    finally:
        for lg in watched:
            lg.removeHandler(records)
    assert counted == {"499": 3.0}, counted
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert any(r.getMessage() == "client disconnected" for r in records.records)
    # and the server still answers
    tenant = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{server}/v1/predict", json={"prompt": "prm_x"}, headers=tenant)
    assert r.status_code == 422 and r.json()["error"]["code"]
