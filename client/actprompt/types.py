"""Typed models of the API's resources (checked against the server's OpenAPI in the server's tests).

Unknown fields are kept (`extra="allow"`): a newer server adding a field does not break an older client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from actprompt.states import (
    TERMINAL_EVALUATION_STATES,
    TERMINAL_JOB_STATES,
    EvaluationStatus,
    JobStatus,
)

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class File(_Model):
    id: str
    object: str = "file"
    filename: str
    bytes: int
    sha256: str
    status: str
    created_at: datetime


class Progress(_Model):
    epoch: int = 0
    epochs: int = 0
    fraction: float = 0.0


class Job(_Model):
    id: str
    object: str = "job"
    status: JobStatus
    backbone: str
    dataset_uri: str
    method: str
    prompt_layer: Any = None
    resolved_layers: list[int] | None = None
    prompt_shape: str
    method_options: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any]
    name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, Any] | None = None
    validation_report: dict[str, Any] | None = None
    prompt_id: str | None = None
    prompt_version: int | None = None
    prompt: str | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    max_attempts: int = 0
    worker_id: str | None = None
    created_at: datetime
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_JOB_STATES


class JobEvent(_Model):
    """A job's event; the stream's closing `end` event has `id` 0 and the final status in `data`."""

    id: int
    object: str = "job.event"
    type: str
    level: str = "info"
    message: str = ""
    data: dict[str, Any] | None = None
    created_at: datetime | None = None


class Prompt(_Model):
    id: str
    object: str = "prompt"
    version: int
    ref: str
    name: str | None = None
    backbone: str
    method: str
    prompt_layer: list[int]
    prompt_shape: str | None = None
    classes: list[str]
    metrics: dict[str, Any] | None = None
    size_bytes: int
    sha256: str
    job_id: str | None = None
    imported: bool = False
    created_at: datetime


class Evaluation(_Model):
    id: str
    object: str = "evaluation"
    status: EvaluationStatus
    prompt: str
    dataset_uri: str
    metrics: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_EVALUATION_STATES


class Backbone(_Model):
    id: str
    model: str
    weights: str
    family: str
    input_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    num_features: int
    num_layers: int
    recommended_layer: int
    spec_hash: str
    created_at: datetime
    layers: list[dict[str, Any]] | None = None


#: What an API key may do (the API's `Scope`): predict, read, train, and admin (the tenant's own keys).
SCOPES = ("predict", "read", "train", "admin")


class Tenant(_Model):
    id: str
    name: str
    created_at: datetime


class TenantCreated(Tenant):
    api_key: str
    key_id: str


class ApiKey(_Model):
    id: str
    tenant_id: str
    prefix: str
    name: str | None = None
    scopes: list[str] = Field(default_factory=list)
    created_at: datetime
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKey):
    api_key: str


class Prediction(_Model):
    label: str
    index: int
    probability: float


class Page(_Model, Generic[T]):
    object: str = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None = None
