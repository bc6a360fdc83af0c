from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(
        default=None, min_length=1, max_length=64, description='"prm_x" (latest version) or "prm_x@3".'
    )
    prompts: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        min_length=1,
        description="Several prompts (one backbone) for the same images, instead of `prompt` (exactly one of "
        "the two): the backbone before the earliest prompt layer runs once per image; the answer lists "
        "`results`.",
    )
    images: list[str] = Field(min_length=1, description="Base64-encoded image files (PNG, JPEG, ...).")
    top_k: int = Field(default=5, ge=1)


class PredictionPublic(BaseModel):
    label: str
    index: int
    probability: float


class PromptPredictions(BaseModel):
    prompt: str = Field(description="The exact version that answered (`id@version`).")
    predictions: list[list[PredictionPublic]] = Field(description="Per image, the top-k classes.")


class PredictResponse(BaseModel):
    object: Literal["predictions"] = "predictions"
    prompt: str | None = Field(default=None, description="The exact version that answered (`id@version`).")
    predictions: list[list[PredictionPublic]] | None = Field(
        default=None, description="Per image, the top-k classes."
    )
    results: list[PromptPredictions] | None = Field(
        default=None, description="With `prompts`: per prompt, in request order, its version and predictions."
    )
