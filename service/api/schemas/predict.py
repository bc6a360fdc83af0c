from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=64, description='"prm_x" (latest version) or "prm_x@3".')
    images: list[str] = Field(min_length=1, description="Base64-encoded image files (PNG, JPEG, ...).")
    top_k: int = Field(default=5, ge=1)


class PredictionPublic(BaseModel):
    label: str
    index: int
    probability: float


class PredictResponse(BaseModel):
    object: Literal["predictions"] = "predictions"
    prompt: str = Field(description="The exact version that answered (`id@version`).")
    predictions: list[list[PredictionPublic]] = Field(description="Per image, the top-k classes.")
