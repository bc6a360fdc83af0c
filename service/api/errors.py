"""One error shape for every failure: `{"error": {"code", "message", "param"}}`; bad input is never a 500."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from service.db.session import is_disconnect
from service.engine.errors import ActpromptError

log = logging.getLogger("actprompt.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    429: "rate_limited",
    503: "unavailable",
    504: "deadline_exceeded",
}


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, at least 1 (the header takes no fractions)."""
    return str(max(1, math.ceil(seconds)))


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"code": code, "message": message, "param": param}},
        headers=headers,
    )


#: Union-member tags pydantic puts into `loc` (`prompt_layer.int`): not field names.
_TYPE_TAG = re.compile(r"^(int|str|float|bool|bytes|none|[a-z-]+\[.*\])$")


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    parts = [p for p in parts if not (isinstance(p, str) and _TYPE_TAG.match(p))]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise TypeError(f"not a RequestValidationError: {exc!r}")
    errors = list(exc.errors())
    if not errors:
        return error_response(422, "invalid_value", "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(
            400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}", "body"
        )
    param = _param(tuple(first.get("loc", ())))
    same = [e for e in errors if _param(tuple(e.get("loc", ()))) == param]
    detail = "; or ".join(dict.fromkeys(str(e.get("msg")) for e in same))  # a union: every member's complaint
    message = f"{param}: {detail}" if param else detail
    if len(errors) > len(same):
        message += f" (and {len(errors) - len(same)} more problem(s))"
    code = "missing_field" if first.get("type") == "missing" else "invalid_value"
    return error_response(422, code, message, param)


async def _product(_: Request, exc: Exception) -> JSONResponse:
    """Any error of the one hierarchy (domain, engine, serving): its own status, code and param."""
    if not isinstance(exc, ActpromptError):
        return error_response(500, "internal_error", "internal server error")
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 503:  # overloaded, the engine restarting, the object store down: when to come back
        retry_after = getattr(exc, "retry_after_s", None) or RETRY_AFTER_SECONDS
        headers = {"Retry-After": retry_after_header(retry_after)}
    return error_response(exc.status, exc.code, exc.message, exc.param, headers)


def _leaf_routes(routes: list[Any]) -> Iterator[Any]:
    """The app's routes, with FastAPI's included routers (included without a prefix here) flattened."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        else:
            yield route


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's)."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        match, _ = route.matches({**request.scope, "method": "\x00"})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise TypeError(f"not an HTTPException: {exc!r}")
    code = _HTTP_CODES.get(exc.status_code, "error")
    headers = dict(exc.headers or {})
    message = str(exc.detail)
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = f"method {request.method} not allowed here; allowed: {', '.join(allowed)}"
    return error_response(exc.status_code, code, message, None, headers or None)


#: How long a client should wait before retrying after a transient dependency failure.
RETRY_AFTER_SECONDS = 1


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A dead connection or an unreachable database: a handled 503 (the keep-alive connection survives).

    Handled here rather than by the catch-all: Starlette's last-resort handler re-raises to the server,
    which then drops the connection and every request already pipelined on it. `OperationalError`
    (connection refused or terminated, too many clients, a deadlock), a disconnect and a pool timeout are
    transient: 503 with `Retry-After`. Any other database error is a bug: 500, still handled.
    """
    transient = isinstance(exc, OperationalError | SATimeoutError) or (
        isinstance(exc, DBAPIError) and is_disconnect(exc)
    )
    if not transient:
        log.error("database error", extra={"path": request.url.path}, exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
    log.warning(
        "database unavailable", extra={"path": request.url.path, "error": str(exc).splitlines()[0][:200]}
    )
    return error_response(
        503,
        "database_unavailable",
        "the database is unavailable; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


#: nginx's "client closed request": what the access log and the request counter record when the client
#: hung up before its body arrived. Nobody receives it; it keeps such requests out of the 5xx rate.
CLIENT_CLOSED_REQUEST = 499


async def _client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    """The client went away mid-body (a load generator stopping, a cancelled upload): not a server
    error, so no traceback, no 500 in the metrics, and no exception handed back to the server."""
    log.info("client disconnected", extra={"path": request.url.path})
    return error_response(CLIENT_CLOSED_REQUEST, "client_closed_request", "the client closed the request")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path}, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ActpromptError, _product)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(SATimeoutError, _database_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected)
