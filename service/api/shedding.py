"""The front's load-shedding gate, in front of the whole app: a predict is refused before its body is read.

Pure ASGI, and outside FastAPI's own middleware, the request middleware and routing: FastAPI reads the body
before it solves dependencies, and reading, parsing and decoding the body is the cost this gate exists to
skip; past saturation most predicts are refused, so each layer a refusal passes through is taken from the
cores the engine needs. A refusal is therefore written here, whole: the API's usual typed error, 503
``overloaded`` with ``Retry-After`` and ``X-Request-ID``; the server discards the unread body and keeps the
connection. It is counted in ``actprompt_http_requests`` like any answer (``count_refusal``), and logged
at most once a second, with the refusals since the last such line, instead of once per request: an
overloaded server must not also flood its log.

A connection refused again within ``repeat_window_s`` (50 ms) of its last refusal gets its refusal after a
short pause (``pause_s``, 10 ms): a client that ignores ``Retry-After`` and re-sends at once would otherwise
turn its connection into a loop of refusals that takes a core away from the requests being served. The
pause is an idle timer on the event loop; it caps such a connection at about a hundred refusals a second.
Any other refusal, the first on a connection or one that comes after a while, is sent at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import token_of_authorization
from service.api.errors import retry_after_header
from service.api.observability import request_id_of
from service.serving.front_gate import FrontGate, Shed

__all__ = ["SHED_PATHS", "LoadShedding", "Refusal"]

log = logging.getLogger("actprompt.access")

#: the routes whose work goes to the engine
SHED_PATHS = frozenset({"/v1/predict"})
#: the scope key under which the gate keeps a request's (tenant, X-Request-ID) once it has read them
_CALLER = "actprompt.caller"


@dataclass(frozen=True)
class Refusal:
    """A refused predict's whole answer (a 503), and how long to hold it back first."""

    headers: list[tuple[bytes, bytes]]
    body: bytes
    pause_s: float


class LoadShedding:
    def __init__(
        self,
        app: ASGIApp,
        *,
        gate: FrontGate,
        tenant_of: Callable[[str], str | None],
        count_refusal: Callable[[], None] = lambda: None,
        pause_s: float = 0.01,
        repeat_window_s: float = 0.05,
        log_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_connections: int = 65_536,
    ) -> None:
        self.app = app
        self.gate = gate
        self.tenant_of = tenant_of  # a key's tenant when this process already knows it, else None
        self.count_refusal = count_refusal
        self.pause_s = pause_s
        self.log_every_s = log_every_s
        self._clock = clock
        self._sleep = sleep
        # connections (client address and port) refused in the last repeat_window_s
        self._just_refused: TTLCache[Any, bool] = TTLCache(max_connections, repeat_window_s, timer=clock)
        self._unlogged: Counter[str] = Counter()  # refusals by reason since the last log line
        self._log_at = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_predict(scope):
            await self.app(scope, receive, send)
            return
        tenant, sent_id = self._caller(scope)
        shed = self.gate.enter(tenant)
        if shed is None:
            try:
                await self.app(scope, receive, send)
            finally:
                self.gate.leave(tenant)
            return
        refusal = self._refusing(scope, shed, sent_id)
        if refusal.pause_s:
            await self._sleep(refusal.pause_s)
        await send({"type": "http.response.start", "status": 503, "headers": refusal.headers})
        await send({"type": "http.response.body", "body": refusal.body})

    def refusal(self, scope: Scope) -> Refusal | None:
        """The answer to a predict that the gate refuses now, counted and logged as sent; None for anything
        else (no place is taken: an admitted predict goes through ``__call__`` as usual).

        For a server that can answer before it builds the request's ASGI task (``SheddingHttpToolsProtocol``).
        """
        if not _is_predict(scope):
            return None
        tenant, sent_id = self._caller(scope)
        shed = self.gate.refusal(tenant)
        return None if shed is None else self._refusing(scope, shed, sent_id)

    def _caller(self, scope: Scope) -> tuple[str | None, bytes | None]:
        """The caller's tenant (None: a key this process does not know yet) and X-Request-ID. A known tenant
        is kept in the scope, so that a predict the protocol let through is not looked up again."""
        known = scope.get(_CALLER)
        if known is not None:
            return known
        token, sent_id = _token_and_request_id(scope)
        tenant = self.tenant_of(token) if token else None
        if tenant is not None:
            scope[_CALLER] = (tenant, sent_id)
        return tenant, sent_id

    def _refusing(self, scope: Scope, shed: Shed, sent_id: bytes | None) -> Refusal:
        client = scope.get("client")
        connection = tuple(client) if client else None  # unknown: treated as just refused
        pause = self.pause_s if connection is None or connection in self._just_refused else 0.0
        if connection is not None:
            self._just_refused[connection] = True
        self.count_refusal()
        self._note(shed.reason)
        body = json.dumps(
            {"error": {"code": "overloaded", "message": shed.message, "param": None}}, separators=(",", ":")
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry_after_header(shed.retry_after_s).encode()),
            (b"x-request-id", request_id_of(sent_id).encode("latin-1")),
        ]
        return Refusal(headers, body, pause)

    def _note(self, reason: str) -> None:
        self._unlogged[reason] += 1
        now = self._clock()
        if now >= self._log_at:
            log.info("predicts refused", extra={"status": 503, "refused": dict(self._unlogged)})
            self._unlogged.clear()
            self._log_at = now + self.log_every_s


def _token_and_request_id(scope: Scope) -> tuple[str | None, bytes | None]:
    """The bearer token and the client's X-Request-ID, from the raw headers (no Request object)."""
    token: str | None = None
    sent_id: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            token = token_of_authorization(value.decode("latin-1"))
        elif name == b"x-request-id":
            sent_id = value
    return token, sent_id


def _is_predict(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in SHED_PATHS
