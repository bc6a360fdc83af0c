"""One error shape for every failure: `{"error": {"code", "message", "param"}}`; bad input is never a 500."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
}


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
    assert isinstance(exc, RequestValidationError)
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
    return error_response(exc.status, exc.code, exc.message, exc.param, headers)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}) or None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path}, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ActpromptError, _product)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
