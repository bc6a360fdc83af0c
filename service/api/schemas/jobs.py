from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

LayerRef = StrictInt | StrictStr  # strict: `true` is not layer 1


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=128, ge=1, le=8192)
    learning_rate: float = Field(default=1e-2, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    warmup_epochs: float = Field(default=0.0, ge=0, le=100)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: bool = False
    val_fraction: float = Field(
        default=0.1, ge=0, le=0.5, description="Share of train held out when there is no val split."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone: str = Field(min_length=1, max_length=64, description="A registered backbone id.")
    dataset_uri: str = Field(
        min_length=1,
        max_length=4096,
        description="An uploaded file id (`file_...`), file:// (under DATA_ROOTS) or https://",
    )
    prompt_layer: LayerRef | list[LayerRef] | None = Field(
        default=None,
        description='Layer index, layer name, a list of them, "all" or "auto"; default: the recommended one. '
        'Only for method "activation".',
    )
    method: str = Field(default="activation", description="activation | input | linear | norm")
    prompt_shape: Literal["full", "channel"] = "full"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    prompt_id: str | None = Field(
        default=None, max_length=40, description="Store the result as a new version of this prompt."
    )

    @field_validator("prompt_layer")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if isinstance(value, list) and not 1 <= len(value) <= 256:
            raise ValueError("a list of 1 to 256 layers")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(str(value)) > 16_384:
            raise ValueError("at most 16 KiB")
        return value


class Progress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    fraction: float = 0.0


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: str
    backbone: str
    dataset_uri: str
    method: str
    prompt_layer: Any
    resolved_layers: list[int] | None
    prompt_shape: str
    hyperparameters: dict[str, Any]
    name: str | None
    metadata: dict[str, Any]
    progress: Progress
    metrics: dict[str, Any] | None
    validation_report: dict[str, Any] | None
    prompt_id: str | None
    prompt_version: int | None
    prompt: str | None = Field(description="`prompt_id@version` of the result, ready for /v1/predict.")
    error: dict[str, Any] | None
    attempts: int
    max_attempts: int
    worker_id: str | None
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobEventPublic(BaseModel):
    id: int
    object: Literal["job.event"] = "job.event"
    type: str
    level: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class CheckpointPublic(BaseModel):
    id: int
    epoch: int
    attempt: int
    size_bytes: int
    created_at: datetime
