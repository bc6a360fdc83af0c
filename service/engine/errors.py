"""The one error hierarchy of the product, rooted here (the engine imports nothing of ours, so the root
lives in the lowest layer): every error raised on purpose is an `ActpromptError` with a stable `code`,
a `message`, the request field (`param`) it is about and the kind of failure (`status`, an HTTP status).

The engine's errors derive from `EngineError`; the use cases' from `service.domain.errors.DomainError`;
serving's from `service.serving.errors.ServingError`. The gateway has one handler for the root and turns
any of them into `{"error": {"code", "message", "param"}}`, so bad input is always a 4xx, never a 500.
This module imports nothing heavy (no torch), so any layer can import it.
"""

from __future__ import annotations

from typing import Any


class ActpromptError(Exception):
    """Root of every error the product raises on purpose: (code, message, param) plus a status."""

    status: int = 400
    code: str = "invalid_request"
    param: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param
        #: JSON-able context (a failed dataset's validation report), kept beside the message.
        self.details = details

    def to_dict(self) -> dict[str, str | None]:
        """The body of the API's error object."""
        return {"code": self.code, "message": self.message, "param": self.param}


class EngineError(ActpromptError):
    """Base of every error the engine raises on purpose: a request the engine cannot carry out (422)."""

    status = 422
    code = "engine_error"


class BackboneError(EngineError):
    """Unknown model, unusable weights source, or a checkpoint that does not fit the model."""

    code = "invalid_backbone"
    param = "backbone"


class LayerError(EngineError):
    """A prompt layer that is not in the backbone's catalog."""

    code = "invalid_prompt_layer"
    param = "prompt_layer"


class MethodError(EngineError):
    """Unknown method or a method configuration that cannot work."""

    code = "invalid_method"
    param = "method"


class DatasetError(EngineError):
    """A dataset that cannot be read or does not meet the minimums."""

    code = "invalid_dataset"
    param = "dataset_uri"


class ImageDecodeError(EngineError):
    """An image that does not decode."""

    code = "invalid_image"
    param = "images"


class ArtifactError(EngineError):
    """A corrupt artifact, an unknown format version, or one trained on another backbone."""

    code = "invalid_artifact"
    param = "artifact"


class TrainingCancelled(EngineError):
    """Raised by `fit` when the caller's `should_stop()` returned True."""

    status = 409
    code = "cancelled"
