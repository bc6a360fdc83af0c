from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BackboneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    id: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Tenant-facing name, e.g. `resnet20`."
    )
    model: str = Field(min_length=1, max_length=200, description="timm model name, e.g. `resnet18.a1_in1k`.")
    weights: str = Field(
        default="hub", description='"hub" | "random" | "file:///abs/path.{th,pt,pth,bin,safetensors}"'
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to timm.create_model.")
    input_size: tuple[int, int] | None = Field(
        default=None, description="(H, W); default: the model's own config."
    )
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in ("hub", "random") or value.startswith("file:///"):
            return value
        raise ValueError('must be "hub", "random" or a file:/// URI')

    @field_validator("input_size")
    @classmethod
    def _size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not all(8 <= v <= 4096 for v in value):
            raise ValueError("each side must be between 8 and 4096")
        return value


class LayerPublic(BaseModel):
    index: int
    name: str
    kind: str
    shape: list[int]
    full_params: int = Field(description="Prompt size with prompt_shape=full.")
    channel_params: int = Field(description="Prompt size with prompt_shape=channel.")
    recommended: bool


class BackboneSummary(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    id: str
    model: str
    weights: str
    family: str
    input_size: list[int] | None
    mean: list[float] | None
    std: list[float] | None
    num_features: int
    num_layers: int
    recommended_layer: int
    spec_hash: str
    created_at: datetime


class BackbonePublic(BackboneSummary):
    layers: list[LayerPublic]
