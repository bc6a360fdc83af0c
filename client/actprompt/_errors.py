"""Typed errors: every API error body `{"error": {"code", "message", "param"}}` becomes one of these."""

from __future__ import annotations

from typing import Any


class ActpromptError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(ActpromptError):
    """The server could not be reached (after the retries allowed for the call)."""


class APIError(ActpromptError):
    """The server answered with an error status; `code`, `message` and `param` are the API's own."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, *, headers: Any = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (param: {param})" if param else ""))
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


class BadRequestError(APIError):
    """400."""


class AuthenticationError(APIError):
    """401: no key, or a wrong or revoked one."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404 (also another tenant's object: ids are not shared)."""


class ConflictError(APIError):
    """409, e.g. `file_in_use`, `job_not_cancellable`, `idempotency_key_reused`."""


class PayloadTooLargeError(APIError):
    """413."""


class UnprocessableEntityError(APIError):
    """422: the request was understood but a value is wrong (`param` names it)."""


class RateLimitError(APIError):
    """429; `retry_after` is the server's Retry-After in seconds, when it sent one."""

    @property
    def retry_after(self) -> float | None:
        return _retry_after(self.headers)


class ServiceUnavailableError(APIError):
    """503."""


class InternalServerError(APIError):
    """5xx other than 503."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _retry_after(headers: dict[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def error_from_response(status: int, body: Any, headers: Any) -> APIError:
    """The typed error for a response; a body that is not the API's shape still gives a usable error."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = str(detail.get("code") or "error")
        message = str(detail.get("message") or code)
        param = detail.get("param")
    else:
        code, message, param = "error", str(body)[:500] or f"HTTP {status}", None
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIError)
    return cls(status, code, message, param if isinstance(param, str) else None, headers=headers)
