"""Errors of the use cases: the product's one hierarchy (`ActpromptError`: code, message, param, status)."""

from __future__ import annotations

from typing import Any, TypeVar

from service.engine.errors import ActpromptError


class DomainError(ActpromptError):
    """A use case refused the request; `status` is the kind of failure (an HTTP status)."""

    status = 400
    code = "invalid_request"


class BadRequest(DomainError):
    status = 400


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class PayloadTooLarge(DomainError):
    status = 413
    code = "payload_too_large"


class InvalidInput(DomainError):
    status = 422
    code = "invalid_value"


class TooManyRequests(DomainError):
    status = 429
    code = "rate_limited"


class Unavailable(DomainError):
    status = 503
    code = "unavailable"


T = TypeVar("T")


def found(row: T | None, kind: str, ident: str, *, param: str) -> T:
    """`row`, or the one NotFound of every lookup: "no <kind> '<ident>'", code `<kind>_not_found`."""
    if row is None:
        raise NotFound(f"no {kind} {ident!r}", code=f"{kind}_not_found", param=param)
    return row


#: Engine error codes that are the caller's fault in the request itself (400) rather than its content (422).
_BAD_REQUEST_CODES = {"invalid_dataset_uri"}


def from_engine_error(exc: Any, *, default_param: str | None = None) -> DomainError:
    """Map a `service.engine.errors.EngineError` (duck-typed: `.code`, `.param`) to a domain error."""
    code = str(getattr(exc, "code", "invalid_value"))
    param = getattr(exc, "param", None) or default_param
    cls: type[DomainError] = BadRequest if code in _BAD_REQUEST_CODES else InvalidInput
    return cls(str(exc) or code, code=code, param=param)
