"""The real PostgreSQL failing under the gateway.

* a connection terminated (`pg_terminate_backend`) after the pool's pre-ping handed it out, i.e. while the
  request's query is in flight: a read is retried once on a fresh connection, the caller sees nothing;
* the database refusing every connection: a handled 503 with `Retry-After`, never a 500;
* a handled 503 keeps the client's keep-alive connection: a request pipelined behind it is still answered.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from service.api.main import create_app
from tests.api.conftest import ADMIN_KEY, _truncate, settings_for
from tests.api.serve import serve_in_thread

pytestmark = pytest.mark.postgres

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


class Terminator:
    """After `skip` checkouts, terminates the backend of the next `n` connections the app's pool hands out
    (after its pre-ping: the query that follows fails in flight, as in a real failover)."""

    def __init__(self, engine: Any) -> None:
        self.skip = self.pending = self.killed = 0
        self._lock = threading.Lock()
        event.listen(engine.pool, "checkout", self._on_checkout)

    def arm(self, n: int = 1, *, skip: int = 0) -> None:
        with self._lock:
            self.pending, self.skip = n, skip

    def _on_checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        with self._lock:
            if self.skip > 0:
                self.skip -= 1
                return
            if self.pending <= 0:
                return
            self.pending -= 1
        pid = dbapi_connection.info.backend_pid
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        self.killed += 1


@contextlib.contextmanager
def database_refusing_connections(url: str) -> Iterator[None]:
    """The database exists but takes no connection (as during a restart or failover), then comes back."""
    name = _database_name(url)
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
            "pg_backend_pid()",
            (name,),
        )
    try:
        yield
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def pg_url(pg_database: str) -> str:
    _truncate(pg_database)
    return pg_database


@pytest.fixture
def client(pg_url: str, data_root: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = settings_for(pg_url, data_root, tmp_path, embedded_worker=False)
    # Every request must reach the database here: no remembered keys or prompt references.
    settings = settings.model_copy(update={"auth_cache_seconds": 0.0, "prompt_resolve_cache_seconds": 0.0})
    # 500s come back as responses (as a real server sends them), not as exceptions in the test.
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _tenant(client: TestClient) -> dict[str, str]:
    r = client.post("/v1/tenants", json={"name": "outage"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def test_connection_terminated_mid_request_is_retried_once_for_reads(client: TestClient) -> None:
    tenant = _tenant(client)
    engine = client.app.state.session_factory.kw["bind"]  # type: ignore[attr-defined]
    terminator = Terminator(engine)
    # The request's first query (authentication) runs on a connection whose backend was just terminated.
    terminator.arm(1)
    r = client.get("/v1/jobs", headers=tenant)
    assert terminator.killed == 1
    assert r.status_code == 200, r.text
    # Predict: the connection of the authentication, then of the prompt lookup, killed in flight.
    body = {"prompt": "prm_nope", "images": ["aGk="]}
    for skip in (0, 1):
        terminator.arm(1, skip=skip)
        r = client.post("/v1/predict", headers=tenant, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "prompt_not_found", r.text
    assert terminator.killed == 3
    # Killed again on the retry: no third try, but a handled 503 the client may retry, never a 500.
    terminator.arm(2)
    r = client.post("/v1/predict", headers=tenant, json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
    assert r.headers["retry-after"] == "1"
    assert client.get("/v1/jobs", headers=tenant).status_code == 200


def test_database_refusing_connections_is_a_503_with_retry_after(client: TestClient, pg_url: str) -> None:
    tenant = _tenant(client)
    with database_refusing_connections(pg_url):
        for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/prompts"), ("POST", "/v1/predict")):
            body = {"prompt": "prm_x", "images": ["aGk="]} if method == "POST" else None
            r = client.request(method, path, headers=tenant, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "database_unavailable"
            assert int(r.headers["retry-after"]) >= 1
    assert client.get("/v1/jobs", headers=tenant).status_code == 200  # back at once, same process


# --- the keep-alive connection survives a handled failure ------------------------------------------
@pytest.fixture
def server(pg_url: str, data_root: Path, tmp_path: Path) -> Iterator[str]:
    """The app under a real uvicorn (HTTP/1.1 keep-alive and pipelining), in a thread of this process."""
    settings = settings_for(pg_url, data_root, tmp_path, embedded_worker=False)
    with serve_in_thread(create_app(settings)) as port:
        yield f"127.0.0.1:{port}"


def _pipelined(address: str, requests: list[str]) -> list[int]:
    """Send every request at once on one connection; the status of each response that comes back."""
    host, port = address.split(":")
    raw = "".join(requests).encode()
    statuses: list[int] = []
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(raw)
        data = b""
        while len(statuses) < len(requests):
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break  # the server closed the connection
            data += chunk
            statuses = _statuses(data)
    return statuses


def _statuses(data: bytes) -> list[int]:
    """Status codes of the complete responses in `data` (every response here has a Content-Length)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        length = next(
            int(v) for k, _, v in (x.partition(b":") for x in lines[1:]) if k.lower() == b"content-length"
        )
        if len(rest) < length:
            break
        out.append(int(lines[0].split()[1]))
        data = rest[length:]
    return out


def test_a_handled_database_failure_keeps_the_keep_alive_connection(server: str, pg_url: str) -> None:
    import httpx

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    key = httpx.post(f"http://{server}/v1/tenants", json={"name": "ka"}, headers=admin).json()["api_key"]

    def get(path: str) -> str:
        return f"GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n"

    assert _pipelined(server, [get("/v1/jobs"), get("/healthz")]) == [200, 200]
    with database_refusing_connections(pg_url):
        # Three requests already sent on the connection: the failures are answered and so is the rest.
        statuses = _pipelined(server, [get("/v1/jobs"), get("/v1/prompts"), get("/healthz")])
    assert statuses == [503, 503, 200], statuses
    assert _pipelined(server, [get("/v1/jobs"), get("/healthz")]) == [200, 200]
