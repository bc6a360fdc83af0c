"""The front's load-shedding gate as pure ASGI middleware: a predict is refused before its body is read.

Pure ASGI rather than a FastAPI dependency because FastAPI reads the body before it solves dependencies,
and reading (then parsing and decoding) the body is the cost this gate exists to skip. The refusal is the
API's usual typed error: 503 ``overloaded`` with ``Retry-After``; the server discards the unread body and
keeps the connection.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from service.serving.front_gate import FrontGate, Shed

__all__ = ["SHED_PATHS", "LoadShedding"]

#: the routes whose work goes to the engine
SHED_PATHS = frozenset({"/v1/predict"})


class LoadShedding:
    def __init__(self, app: ASGIApp, *, gate: FrontGate, tenant_of: Callable[[str], str | None]) -> None:
        self.app = app
        self.gate = gate
        self.tenant_of = tenant_of  # a key's tenant when this process already knows it, else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_predict(scope):
            await self.app(scope, receive, send)
            return
        tenant = self._tenant(scope)
        shed = self.gate.enter(tenant)
        if shed is not None:
            await _refuse(send, shed)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave(tenant)

    def _tenant(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                token = token.strip()
                return self.tenant_of(token) if scheme.lower() == "bearer" and token else None
        return None


def _is_predict(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in SHED_PATHS


async def _refuse(send: Send, shed: Shed) -> None:
    body = orjson.dumps({"error": {"code": "overloaded", "message": shed.message, "param": None}})
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(max(1, math.ceil(shed.retry_after_s))).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
