"""The HTTP protocol answers a refused predict itself, in the callback that parsed its headers: no ASGI
task, the app never called, the connection kept for the next request, pipelined requests answered in order.
A real uvicorn on a real socket, driven with raw HTTP/1.1 bytes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httptools
import pytest

from service.api.shedding import LoadShedding
from service.api.shedding_protocol import SheddingHttpToolsProtocol, shedding_of
from service.serving.front_gate import FrontGate
from tests.api.serve import serve_in_thread

PREDICT = b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nX-Request-ID: %s\r\n"
BODY = b'{"prompt":"p","images":[]}'


def predict(request_id: bytes, *, close: bool = False) -> bytes:
    head = PREDICT % request_id + (b"Connection: close\r\n" if close else b"")
    return head + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY


class GatedApp:
    """An app behind its gate, as ``GatedFastAPI``: every call it gets is recorded."""

    def __init__(self, gate: FrontGate) -> None:
        self.calls: list[str] = []
        self.tenant_lookups: list[str] = []
        self.shedding = LoadShedding(self._inner, gate=gate, tenant_of=self._tenant_of)

    def _tenant_of(self, token: str) -> str | None:
        self.tenant_lookups.append(token)
        return "t1" if token == "known" else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls.append(scope["path"])
        await self.shedding(scope, receive, send)

    async def _inner(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b"ok " + scope["path"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Responses:
    """HTTP/1.1 responses read off a raw socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._current = {"headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"][name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._current["body"] += body

    def on_message_complete(self) -> None:
        self._current["status"] = self.parser.get_status_code()
        self.done.append(self._current)

    def read(self, n: int) -> list[dict[str, Any]]:
        while len(self.done) < n:
            data = self.sock.recv(65536)
            if not data:
                break
            self.parser.feed_data(data)
        return self.done[:n]


@pytest.fixture()
def full() -> Iterator[tuple[GatedApp, int]]:
    gate = FrontGate(max_in_flight=1)
    assert gate.enter(None) is None  # the only place is taken: every predict is refused
    app = GatedApp(gate)
    with serve_in_thread(app, http=SheddingHttpToolsProtocol) as port:
        yield app, port


def test_a_refused_predict_never_reaches_the_app_and_the_connection_serves_on(
    full: tuple[GatedApp, int],
) -> None:
    app, port = full
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        got = Responses(sock)
        sock.sendall(predict(b"a1"))
        (refused,) = got.read(1)
        sock.sendall(b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n")
        _, other = got.read(2)
    assert refused["status"] == 503 and refused["headers"]["retry-after"] == "1"
    assert (
        refused["headers"]["x-request-id"] == "a1"
        and refused["headers"]["content-type"] == "application/json"
    )
    assert "date" in refused["headers"]  # uvicorn's own headers, as on any answer
    assert json.loads(refused["body"])["error"]["code"] == "overloaded"
    assert other["status"] == 200 and other["body"] == b"ok /other"  # the same connection, read on
    assert app.calls == ["/other"]  # the refusal was written before any ASGI call


def test_pipelined_requests_are_answered_in_order_around_a_paused_refusal(full: tuple[GatedApp, int]) -> None:
    app, port = full
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        got = Responses(sock)
        # the second predict on this connection comes straight back: its refusal is held back for a pause,
        # and the GET pipelined behind it must wait for it
        sent = time.perf_counter()
        sock.sendall(predict(b"b1") + predict(b"b2") + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        answers = got.read(3)
        took = time.perf_counter() - sent
    assert took >= 0.009  # the pause (10 ms) was taken, not skipped
    assert [a["status"] for a in answers] == [503, 503, 200]
    assert [a["headers"].get("x-request-id") for a in answers[:2]] == ["b1", "b2"]
    assert answers[2]["body"] == b"ok /after"
    assert app.calls == ["/after"]


def test_a_refusal_on_a_closing_connection_says_so_and_closes_it(full: tuple[GatedApp, int]) -> None:
    _, port = full
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        got = Responses(sock)
        sock.sendall(predict(b"c1", close=True))
        (refused,) = got.read(1)
        assert sock.recv(1) == b""  # closed by the server
    assert refused["status"] == 503 and refused["headers"]["connection"] == "close"


def test_an_admitted_predicts_caller_is_looked_up_once() -> None:
    """The protocol asks the gate, then the app's gate admits the predict: one tenant lookup between them."""
    app = GatedApp(FrontGate(max_in_flight=4))
    head = PREDICT % b"d1" + b"Authorization: Bearer known\r\n"
    with serve_in_thread(app, http=SheddingHttpToolsProtocol) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with sock:
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)
            (answer,) = Responses(sock).read(1)
    assert answer["status"] == 200 and answer["body"] == b"ok /v1/predict"
    assert app.tenant_lookups == ["known"]
    assert app.shedding.gate.in_flight == 0  # its place was taken once and given back


def test_the_gate_is_found_under_uvicorns_middleware() -> None:
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    app = GatedApp(FrontGate())
    assert shedding_of(ProxyHeadersMiddleware(app)) is app.shedding  # type: ignore[arg-type]
    assert shedding_of(object()) is None
