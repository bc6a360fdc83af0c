from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from service.domain.tenants import Scope


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="Display name.")


class TenantPublic(BaseModel):
    id: str
    name: str
    created_at: datetime


class TenantCreated(TenantPublic):
    api_key: str = Field(description="The tenant's first API key; shown only in this response.")
    key_id: str


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=200)
    scopes: list[Scope] = Field(
        default_factory=lambda: sorted(Scope),
        description="What the key may do: `predict` (POST /v1/predict), `read` (every GET), `train` "
        "(uploads, jobs, evaluations, prompt imports, deletions, pins), `admin` (the tenant's own keys). "
        "Default: all four.",
    )


class KeyPublic(BaseModel):
    id: str
    tenant_id: str
    prefix: str = Field(description="The first characters of the key, to tell keys apart.")
    name: str | None
    scopes: list[Scope]
    created_at: datetime
    revoked_at: datetime | None = None


class KeyCreated(KeyPublic):
    api_key: str = Field(description="The secret; shown only in this response.")
