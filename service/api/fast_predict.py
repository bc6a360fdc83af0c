"""A JSON predict from a key this process already knows, answered without FastAPI's router.

Profiled under load on the 2-core benchmark machine, a one-image predict spent about a third of its front
process's CPU between the load-shedding gate and the route's own code: Starlette's exception middleware,
routing, the solving of six dependencies and the response plumbing. This pure-ASGI layer sits exactly
there (inside the request metrics and the gate) and answers the common case itself: ``POST /v1/predict``
with a JSON body and a tenant key this process has already authenticated, holding the ``predict`` scope.
It calls what the route calls (the rate limit, the body's parsing and limits, the domain's predict, the
answer's shape), and turns an exception into the response the app's own exception handlers give, so both
paths answer alike, errors included.

Everything else goes on to FastAPI, which stays the one place that documents the endpoint and the only
path for the rest: a key not seen yet (authenticated against the database there, then remembered), a key
without the scope or the admin key, a multipart or non-JSON body, a malformed deadline header. All of
that is decided from the headers, before the body is read.
"""

from __future__ import annotations

import inspect
import math

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import bearer_token, enforce_rate_limit
from service.api.routes import predict as predict_route
from service.domain.tenants import Principal
from service.domain.tenants import Scope as KeyScope

__all__ = ["FastPredict"]

PATH = "/v1/predict"  # exactly: a trailing slash gets FastAPI's redirect, as before
DEADLINE_HEADER = b"x-request-deadline-ms"
#: the route this answers for (its router is included without a prefix)
ROUTE = next(
    r
    for r in predict_route.router.routes
    if isinstance(r, APIRoute) and r.path == PATH and "POST" in (r.methods or ())
)


class FastPredict:
    """The fast path for ``POST /v1/predict`` (see the module's docstring for what it takes and leaves)."""

    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app  # the app whose state, route and exception handlers this reuses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_json_predict(scope):
            await self.app(scope, receive, send)
            return
        app = self.fastapi_app
        request = Request(scope, receive)
        principal = _known_predictor(app, request)
        plain, deadline_ms = _deadline_ms(scope)
        if principal is None or not plain:
            await self.app(scope, receive, send)
            return
        scope["route"] = ROUTE  # the request metrics label it as the route would
        state = app.state
        deadline = predict_route.deadline_after(deadline_ms)
        try:
            tenant_id = str(principal.tenant_id)
            await enforce_rate_limit(state.rate_limiter, tenant_id)
            parsed = await predict_route.parse_json_body(await request.body(), state.settings)
            response = await predict_route.answer(
                parsed, tenant_id, state.settings, state.predictor, state.prompt_resolver, deadline
            )
        except Exception as exc:
            response = await _handled(app, request, exc)
        await response(scope, receive, send)


def _is_json_predict(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json"
    return True  # no Content-Type: JSON, as FastAPI assumes


def _known_predictor(app: FastAPI, request: Request) -> Principal | None:
    """The caller, if this process remembers its key and the key may predict for a tenant; else None."""
    authenticator = getattr(app.state, "authenticator", None)
    token = bearer_token(request)
    principal = authenticator.cached(token) if authenticator is not None and token else None
    if principal is None or principal.tenant_id is None or KeyScope.PREDICT not in principal.scopes:
        return None
    return principal


def _deadline_ms(scope: Scope) -> tuple[bool, float | None]:
    """(whether the deadline header is absent or a finite number > 0, its value): anything else is left to
    FastAPI's validation to answer."""
    for name, value in scope["headers"]:
        if name == DEADLINE_HEADER:
            try:
                ms = float(value)
            except ValueError:
                return False, None
            return (True, ms) if ms > 0 and math.isfinite(ms) else (False, None)
    return True, None


async def _handled(app: FastAPI, request: Request, exc: Exception) -> Response:
    """The response the app's exception handler for ``exc`` gives (the nearest class in its MRO)."""
    for cls in type(exc).__mro__:
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            response = handler(request, exc)
            return await response if inspect.isawaitable(response) else response
    raise exc
