from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class PromptPublic(BaseModel):
    id: str
    object: Literal["prompt"] = "prompt"
    version: int
    ref: str = Field(description="`id@version`.")
    name: str | None
    backbone: str
    method: str
    prompt_layer: list[int]
    prompt_shape: str | None
    classes: list[str]
    metrics: dict[str, Any] | None
    size_bytes: int
    sha256: str
    job_id: str | None
    imported: bool
    created_at: datetime
