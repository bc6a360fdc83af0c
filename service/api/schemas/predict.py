from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

#: The request's fields that may repeat in a multipart form (the rest are single text parts).
LIST_FIELDS = frozenset({"prompts", "images"})


class PredictRequest(BaseModel):
    """One model for both encodings: a JSON body, or a multipart form (whose file parts are `bytes`)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(
        default=None, min_length=1, max_length=64, description='"prm_x" (latest version) or "prm_x@3".'
    )
    prompts: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        min_length=1,
        validate_default=True,
        description="Several prompts (one backbone) for the same images, instead of `prompt` (exactly one of "
        "the two): the backbone before the earliest prompt layer runs once per image; the answer lists "
        "`results`.",
    )
    images: list[str | bytes] = Field(
        min_length=1,
        description="Each image a base64-encoded image file (PNG, JPEG, ...) or an http(s) URL the server "
        "fetches; in a multipart form, file parts and text parts holding either.",
    )
    top_k: int = Field(default=5, ge=1)

    @field_validator("prompts")
    @classmethod
    def _exactly_one_of_prompt_and_prompts(
        cls, prompts: list[str] | None, info: ValidationInfo
    ) -> list[str] | None:
        if "prompt" in info.data and (info.data["prompt"] is None) == (prompts is None):
            raise ValueError("give exactly one of prompt and prompts")
        return prompts


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
