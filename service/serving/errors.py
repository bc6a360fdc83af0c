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
