from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator

from service.api.schemas.common import FromRow


class PromptPublic(FromRow):
    id: str = Field(validation_alias=AliasChoices("prompt_id", "id"))
    object: Literal["prompt"] = "prompt"
    version: int
    ref: str = Field(description="`id@version`.")
    name: str | None
    backbone: str = Field(validation_alias=AliasChoices("backbone_id", "backbone"))
    method: str
    prompt_layer: list[int] = Field(validation_alias=AliasChoices("prompt_layers", "prompt_layer"))
    prompt_shape: str | None
    classes: list[str]
    metrics: dict[str, Any] | None
    size_bytes: int
    sha256: str
    job_id: str | None
    imported: bool
    created_at: datetime

    @field_validator("classes", mode="before")
    @classmethod
    def _class_names(cls, value: Any) -> Any:
        return [str(c) for c in value] if isinstance(value, list) else value
