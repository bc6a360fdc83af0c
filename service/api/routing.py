"""`CheckedRoute`: the checks every route makes before FastAPI reads the body.

FastAPI parses and validates the body before it runs a route's dependencies, so on its own an anonymous
caller with a malformed body learns about the JSON (400/422) before being told it is not authenticated,
and a JSON model sent as `text/plain` gets a 422 naming no field. This route class runs, in order:

1. authentication (401), for every route that depends on the caller;
2. the body's `Content-Type` against what the route reads (415 naming the expected type);

and only then the normal handler. Every router uses it (`APIRouter(route_class=CheckedRoute)`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.params import Form
from fastapi.routing import APIRoute

from service.api import deps
from service.domain.errors import DomainError

JSON = "application/json"


class UnsupportedMediaType(DomainError):
    status = 415
    code = "unsupported_media_type"


def _depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def accepted_media_types(route: APIRoute) -> tuple[str, ...]:
    """What a route's body may be: the documented request content types, or what its parameters read."""
    documented = ((route.openapi_extra or {}).get("requestBody") or {}).get("content")
    if documented:
        return tuple(documented)
    if not route.dependant.body_params:
        return ()
    if any(isinstance(p.field_info, Form) for p in route.dependant.body_params):  # File is a Form
        return ("multipart/form-data", "application/x-www-form-urlencoded")
    return (JSON,)


def _matches(content_type: str, accepted: tuple[str, ...]) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    if not media:  # no header: FastAPI's own default (JSON) applies
        return True
    if JSON in accepted and media.startswith("application/") and media.endswith("+json"):
        return True
    return media in accepted


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return (length is not None and length.strip() not in ("", "0")) or "transfer-encoding" in request.headers


class CheckedRoute(APIRoute):
    """An `APIRoute` that authenticates and checks the body's media type before the body is parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needs_caller = _depends_on(self.dependant, deps.authenticate_dependency)
        accepted = accepted_media_types(self)

        async def checked(request: Request) -> Response:
            if needs_caller:
                await deps.authenticate_request(request)
            content_type = request.headers.get("content-type", "")
            if accepted and _has_body(request) and not _matches(content_type, accepted):
                raise UnsupportedMediaType(
                    f"Content-Type {content_type.split(';', 1)[0]!r} is not supported here; "
                    f"send {' or '.join(accepted)}",
                    param="Content-Type",
                )
            return await handler(request)

        return checked
