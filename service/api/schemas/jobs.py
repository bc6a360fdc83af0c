from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from actprompt.states import JobStatus
from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from service.api.schemas.common import FromRow
from service.domain.jobs import METHOD_OPTIONS_KEY, check_metadata, stored_metadata
from service.engine.method_search import AUTO
from service.engine.methods import PROMPT_SHAPES, list_methods
from service.engine.pipeline import SplitSpec
from service.engine.train import OPTIMIZERS, TrainConfig

LayerRef = StrictInt | StrictStr  # strict: `true` is not layer 1

#: The engine's defaults and allowed values are the API's: one source of truth (checked by a test).
_TRAIN = TrainConfig()
_SPLIT = SplitSpec()


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    """A validator that takes only `choices` (which the field's schema lists as its enum)."""

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return value

    return check


#: Methods a job may train: the registry's servable ones (a new method appears here by registering).
SERVABLE_METHODS: list[Any] = list_methods(servable_only=True)
#: What a job may ask for: a servable method or the search among them.
JOB_METHODS: list[Any] = [*SERVABLE_METHODS, AUTO]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=_TRAIN.epochs, ge=1, le=1000)
    batch_size: int = Field(default=_TRAIN.batch_size, ge=1, le=8192)
    learning_rate: float = Field(default=_TRAIN.learning_rate, gt=0, le=10)
    weight_decay: float = Field(default=_TRAIN.weight_decay, ge=0, le=1)
    optimizer: Annotated[str, AfterValidator(_one_of(OPTIMIZERS))] = Field(
        default=_TRAIN.optimizer, json_schema_extra={"enum": list(OPTIMIZERS)}
    )
    momentum: float = Field(default=_TRAIN.momentum, ge=0, lt=1)
    warmup_epochs: float = Field(default=_TRAIN.warmup_epochs, ge=0, le=100)
    label_smoothing: float = Field(default=_TRAIN.label_smoothing, ge=0, lt=1)
    augment: bool = _TRAIN.augment
    val_fraction: float = Field(
        default=_SPLIT.val_fraction,
        ge=0,
        le=0.5,
        description="Share of train held out when there is no val split.",
    )
    seed: int = Field(default=_TRAIN.seed, ge=0, le=2**31 - 1)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone: str = Field(min_length=1, max_length=64, description="A registered backbone id.")
    dataset_uri: str = Field(
        min_length=1,
        max_length=4096,
        description="An uploaded file id (`file_...`), file:// (under DATA_ROOTS), https://, or s3:// (under "
        "the operator's DATASET_S3_PREFIXES; elsewhere 403 dataset_uri_not_allowed)",
    )
    prompt_layer: LayerRef | Annotated[list[LayerRef], Field(min_length=1, max_length=256)] | None = Field(
        default=None,
        description='Layer index, layer name, a list of them, "all" or "auto"; default: the recommended one. '
        "Only for methods with prompt layers (activation); refused with any other.",
    )
    method: str = Field(
        default="activation",
        description='The adaptation method (the registry\'s servable methods), or "auto": each servable '
        "candidate (activation at the auto layer, deep_activation_norm, lora r=4) trained at its own "
        "learning rate on the training split and one chosen on validation; the job's metrics.auto "
        "records every candidate. The stored prompt has the chosen method.",
        json_schema_extra={"enum": JOB_METHODS},
    )
    prompt_shape: Annotated[str, AfterValidator(_one_of(PROMPT_SHAPES))] = Field(
        default="full",
        description="Activation prompt shape; only for methods with prompt layers.",
        json_schema_extra={"enum": list(PROMPT_SHAPES)},
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        description="The method's own options besides prompt_layer and prompt_shape, e.g. "
        '`{"lora_rank": 8}` for lora; for auto: `max_train_seconds` (a budget on the search), `prefer` '
        '("accuracy" or "cost": the cheapest serving cost within `tolerance` of the best validation '
        "accuracy) and `tolerance` (a fraction, default 0.01). An option the method does not take is a 422.",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Free JSON kept with the job: at most 16 KiB, nesting depth 8, 256 keys in all.",
    )
    prompt_id: str | None = Field(
        default=None, max_length=40, description="Store the result as a new version of this prompt."
    )

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        problem = check_metadata(value)  # before parsing: a 300-deep value must not reach the parser
        if problem is not None:
            raise ValueError(problem)
        return value


class Progress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    fraction: float = 0.0


class JobPublic(FromRow):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    backbone: str = Field(validation_alias=AliasChoices("backbone_id", "backbone"))
    dataset_uri: str
    method: str
    prompt_layer: Any
    resolved_layers: list[int] | None
    prompt_shape: str
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        validation_alias=AliasChoices(AliasPath("hyperparameters", METHOD_OPTIONS_KEY), "method_options"),
    )
    hyperparameters: dict[str, Any]
    name: str | None
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    progress: Progress
    metrics: dict[str, Any] | None
    validation_report: dict[str, Any] | None
    prompt_id: str | None
    prompt_version: int | None
    prompt: str | None = Field(
        validation_alias=AliasChoices("prompt_ref", "prompt"),
        description="`prompt_id@version` of the result, ready for /v1/predict.",
    )
    error: dict[str, Any] | None
    attempts: int
    max_attempts: int
    worker_id: str | None
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @field_validator("method_options", mode="before")
    @classmethod
    def _options(cls, value: Any) -> dict[str, Any]:
        return dict(value or {})

    @field_validator("hyperparameters", mode="before")
    @classmethod
    def _without_method_options(cls, value: Any) -> dict[str, Any]:
        """The method options are stored inside the hyperparameters JSON; shown beside them."""
        return {k: v for k, v in (value or {}).items() if k != METHOD_OPTIONS_KEY}

    @field_validator("metadata", mode="before")
    @classmethod
    def _bounded_metadata(cls, value: Any) -> dict[str, Any]:
        return stored_metadata(value)

    @field_validator("progress", mode="before")
    @classmethod
    def _progress(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Progress):
            return value
        value = dict(value or {})
        value.setdefault("epochs", (info.data.get("hyperparameters") or {}).get("epochs", 0))
        return value


class JobEventPublic(FromRow):
    id: int
    object: Literal["job.event"] = "job.event"
    type: str
    level: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class CheckpointPublic(FromRow):
    id: int
    epoch: int
    attempt: int
    size_bytes: int
    created_at: datetime
