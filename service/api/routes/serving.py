"""`POST /v1/prompts/{id}/pin`, `DELETE /v1/prompts/{id}/pin`: keep a prompt resident in this process.

A pin holds the artifact in host memory and in a device slot of its backbone until unpinned, deleted or the
process restarts (pins are a cache hint, not stored state). `prm_x` pins the version that is latest now.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import PredictorDep, ResolverDep, TrainTenantDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES
from service.domain import predict as predict_domain

router = APIRouter(route_class=CheckedRoute, tags=["prompts"], responses=ERROR_RESPONSES)


class PinPublic(BaseModel):
    object: Literal["prompt_pin"] = "prompt_pin"
    prompt: str = Field(description="The exact version the pin applies to (`id@version`).")
    pinned: bool


@router.post("/v1/prompts/{prompt_ref}/pin", response_model=PinPublic)
async def pin_prompt(
    prompt_ref: str, tenant_id: TrainTenantDep, resolver: ResolverDep, predictor: PredictorDep
) -> PinPublic:
    """Load the prompt now and keep it resident (409 when the pinned share of the cache is full)."""
    ref = await predict_domain.pin(resolver, predictor, tenant_id, prompt_ref)
    return PinPublic(prompt=ref, pinned=True)


@router.delete("/v1/prompts/{prompt_ref}/pin", response_model=PinPublic)
async def unpin_prompt(
    prompt_ref: str, tenant_id: TrainTenantDep, resolver: ResolverDep, predictor: PredictorDep
) -> PinPublic:
    """Let the prompt be evicted again like any other (idempotent)."""
    ref = await predict_domain.unpin(resolver, predictor, tenant_id, prompt_ref)
    return PinPublic(prompt=ref, pinned=False)
