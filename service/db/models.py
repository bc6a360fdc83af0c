"""The tables. Ids are prefixed and time-ordered (`job_0193...`), so sorting by id is sorting by creation."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from actprompt.states import EvaluationStatus, JobStatus
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import Mapped, deferred, mapped_column

from service.db.base import Base, utcnow


def _status_type(states: type[StrEnum]) -> SAEnum:
    """A state stored as its string value in a VARCHAR(16) (no database enum type, no CHECK constraint), so
    the schema stays the migrations' and a new state needs no migration; rows read back as the enum."""
    return SAEnum(
        states,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A tenant's key; only its sha256 is stored, plus a visible prefix to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    #: what the key may do: names of `service.domain.tenants.Scope`, as a JSON list
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class Backbone(Base):
    """A frozen model shared by every tenant; its layer catalog is computed once, at registration."""

    __tablename__ = "backbones"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    weights: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # BackboneSpec.to_dict() of the resolved spec
    spec_hash: Mapped[str] = mapped_column(String(64), index=True)
    family: Mapped[str] = mapped_column(String(16))
    num_features: Mapped[int] = mapped_column(Integer)
    recommended_layer: Mapped[int] = mapped_column(Integer)
    layers: Mapped[list[Any]] = mapped_column(JSON)  # [LayerInfo as dict]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A training request; the row (not the broker) is the source of truth, claimed by a lease."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(_status_type(JobStatus))
    backbone_id: Mapped[str] = mapped_column(String(64))  # no FK: a finished job outlives its backbone
    dataset_uri: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(32))
    prompt_layer: Mapped[Any] = mapped_column(JSON, nullable=True)  # as requested
    resolved_layers: Mapped[list[Any] | None] = mapped_column(JSON)
    prompt_shape: Mapped[str] = mapped_column(String(16))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    name: Mapped[str | None] = mapped_column(String(200))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    target_prompt_id: Mapped[str | None] = mapped_column(
        String(40)
    )  # retrain into a new version of this prompt
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    validation_report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prompt_id: Mapped[str | None] = mapped_column(String(40))
    prompt_version: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    requeues: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    enqueued_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def prompt_ref(self) -> str | None:
        """`prompt_id@version` of the result, once there is one."""
        return f"{self.prompt_id}@{self.prompt_version}" if self.prompt_id else None


class JobEvent(Base):
    """A log line, a state change, a progress tick or an epoch's metrics; ids ascend, so they are cursors."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(40))
    type: Mapped[str] = mapped_column(
        String(32)
    )  # state | progress | epoch | validation | layer_search | log ...
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    """The engine's `Checkpoint.to_bytes()` after an epoch; only the latest few are kept."""

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_id_epoch", "job_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(40))
    epoch: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prompt(Base):
    """One immutable version of a prompt (`prm_x@3`); `key` is the internal id the serving layer sees."""

    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("prompt_id", "version"),
        Index("ix_prompts_tenant_id_prompt_id", "tenant_id", "prompt_id"),
    )

    key: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt_id: Mapped[str] = mapped_column(String(40))
    version: Mapped[int] = mapped_column(Integer)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    backbone_id: Mapped[str] = mapped_column(ForeignKey("backbones.id"))
    name: Mapped[str | None] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    prompt_layers: Mapped[list[Any]] = mapped_column(JSON)
    prompt_shape: Mapped[str | None] = mapped_column(String(16))
    classes: Mapped[list[Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_id: Mapped[str | None] = mapped_column(String(40))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    artifact: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    imported: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def ref(self) -> str:
        """`prompt_id@version`: how the API names this version."""
        return f"{self.prompt_id}@{self.version}"


class File(Base):
    """An uploaded file (a dataset archive); the bytes live in `service.storage`, under `storage_key`."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(16))  # uploaded
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """A prompt scored on a labelled dataset through the serving path: top-1/top-5, per class, confusion."""

    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_tenant_id_id", "tenant_id", "id"),
        Index("ix_evaluations_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[EvaluationStatus] = mapped_column(_status_type(EvaluationStatus))
    prompt_id: Mapped[str] = mapped_column(String(40))
    prompt_version: Mapped[int] = mapped_column(Integer)
    dataset_uri: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    runner_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def prompt_ref(self) -> str:
        """`prompt_id@version` that is scored."""
        return f"{self.prompt_id}@{self.prompt_version}"
