"""Serving errors, shaped like the engine's (code, param, message) so the gateway maps both alike."""

from __future__ import annotations


class ServingError(Exception):
    """Base of every serving error; ``code`` and ``param`` go straight into the API's error body."""

    code: str = "serving_error"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class PromptNotFoundError(ServingError):
    """The prompt's artifact is gone (deleted, replaced) or was never there: the gateway answers 404."""

    code = "prompt_not_found"
    param = "prompt"


class PinLimitError(ServingError):
    """Pinning more would leave too few device slots for unpinned traffic: the gateway answers 409."""

    code = "pin_limit_reached"
    param = "prompt"


class ServingClosedError(ServingError):
    """The predictor is shutting down and takes no new work: the gateway answers 503."""

    code = "serving_unavailable"
