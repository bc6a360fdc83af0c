"""The front's load-shedding gate as pure ASGI middleware: a predict is refused before its body is read.

Pure ASGI rather than a FastAPI dependency because FastAPI reads the body before it solves dependencies,
and reading (then parsing and decoding) the body is the cost this gate exists to skip. The refusal is the
API's usual typed error: 503 ``overloaded`` with ``Retry-After``; the server discards the unread body and
keeps the connection.

A refusal is sent after a short pause (``pause_s``, 10 ms by default): a client that ignores
``Retry-After`` and re-sends at once would otherwise turn each connection into a loop of refusals that
takes a core away from the requests being served. The pause is an idle timer on the event loop; it
caps such a connection at about a hundred refusals a second and stays far inside the 50 ms a refusal may
take.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import bearer_token
from service.api.errors import error_response, retry_after_header
from service.serving.front_gate import FrontGate

__all__ = ["SHED_PATHS", "LoadShedding"]

#: the routes whose work goes to the engine
SHED_PATHS = frozenset({"/v1/predict"})


class LoadShedding:
    def __init__(
        self,
        app: ASGIApp,
        *,
        gate: FrontGate,
        tenant_of: Callable[[str], str | None],
        pause_s: float = 0.01,
    ) -> None:
        self.app = app
        self.gate = gate
        self.tenant_of = tenant_of  # a key's tenant when this process already knows it, else None
        self.pause_s = pause_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_predict(scope):
            await self.app(scope, receive, send)
            return
        token = bearer_token(Request(scope))
        tenant = self.tenant_of(token) if token else None
        shed = self.gate.enter(tenant)
        if shed is not None:
            retry_after = {"Retry-After": retry_after_header(shed.retry_after_s)}
            refusal = error_response(503, "overloaded", shed.message, None, retry_after)
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
            await refusal(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave(tenant)


def _is_predict(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in SHED_PATHS
