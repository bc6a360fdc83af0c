"""Typed engine errors: each carries a stable `code` and the request field (`param`) it is about.

The gateway turns them into `{"error": {"code", "message", "param"}}` without knowing the engine,
so a bad layer, dataset or image is always a clear 4xx and never a 500.
"""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    code: str = "engine_error"
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
        #: JSON-able context (a failed dataset's validation report), kept beside the message.
        self.details = details
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param


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

    code = "cancelled"
