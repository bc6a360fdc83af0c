"""Serving errors: part of the product's one hierarchy (`ActpromptError`: code, message, param, status)."""

from __future__ import annotations

from service.engine.errors import ActpromptError


class ServingError(ActpromptError):
    """Base of every serving error; ``code`` and ``param`` go straight into the API's error body."""

    status = 503
    code = "serving_error"


class PromptNotFoundError(ServingError):
    """The prompt's artifact is gone (deleted, replaced) or was never there: the gateway answers 404."""

    status = 404
    code = "prompt_not_found"
    param = "prompt"


class PinLimitError(ServingError):
    """Pinning more would leave too few device slots for unpinned traffic: the gateway answers 409."""

    status = 409
    code = "pin_limit_reached"
    param = "prompt"


class ServingClosedError(ServingError):
    """The predictor is shutting down and takes no new work: the gateway answers 503."""

    code = "serving_unavailable"


class OverloadedError(ServingError):
    """The engine cannot start this request within its queue-wait budget: refused at once (503 with
    ``Retry-After``), so a saturated server answers fast instead of queueing without bound."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float, excess_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        #: how far the expected wait was over the budget: the fronts shed this tenant for that long
        self.excess_s = retry_after_s if excess_s is None else excess_s


class DeadlineExceededError(ServingError):
    """The request's own deadline passed before its rows were computed; they were dropped (504)."""

    status = 504
    code = "deadline_exceeded"
    param = "X-Request-Deadline-Ms"


class EngineUnavailableError(ServingError):
    """The engine process is gone or not answering: the front fails fast (503) while it restarts."""

    code = "engine_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineReplyTimeoutError(EngineUnavailableError):
    """The engine took longer than the front's ceiling to answer one request: the front gives up on it
    (503 with ``Retry-After``) rather than hold the connection without bound; the engine is not marked
    down, since its heartbeat still decides that."""

    code = "engine_timeout"
