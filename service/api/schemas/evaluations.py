from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from actprompt.states import EvaluationStatus
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from service.api.schemas.common import FromRow


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(
        min_length=1, max_length=64, description='"prm_x" (the latest version, pinned now) or "prm_x@3".'
    )
    dataset_uri: str = Field(
        min_length=1,
        max_length=4096,
        description="A labelled dataset: an uploaded file id (`file_...`), file://, https:// or s3://. "
        "Its test split is scored when it has one, else every image.",
    )


class EvaluationPublic(FromRow):
    id: str
    object: Literal["evaluation"] = "evaluation"
    status: EvaluationStatus
    prompt: str = Field(
        validation_alias=AliasChoices("prompt_ref", "prompt"),
        description="`prompt_id@version` that was scored.",
    )
    dataset_uri: str
    metrics: dict[str, Any] | None = Field(
        description="num_images, top1, top5, classes, per_class {label: {support, accuracy}}, "
        "confusion_matrix (rows: true class, columns: predicted; `confusion` cells above 200 classes)."
    )
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
