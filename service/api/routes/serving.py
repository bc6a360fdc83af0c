"""`POST /v1/prompts/{id}/pin`, `DELETE /v1/prompts/{id}/pin`: keep a prompt resident in this process.

A pin holds the artifact in host memory and in a device slot of its backbone until unpinned, deleted or the
process restarts (pins are a cache hint, not stored state). `prm_x` pins the version that is latest now.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.batching import BatchingPredictor
from service.api.deps import PredictorDep, SessionFactoryDep, TenantIdDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES
from service.domain import prompts
from service.domain.errors import Conflict
from service.domain.predict import Predictor

router = APIRouter(route_class=CheckedRoute, tags=["prompts"], responses=ERROR_RESPONSES)


class PinPublic(BaseModel):
    object: Literal["prompt_pin"] = "prompt_pin"
    prompt: str = Field(description="The exact version the pin applies to (`id@version`).")
    pinned: bool


async def _handle(factory: SessionFactoryDep, tenant_id: str, ref: str) -> prompts.PromptHandle:
    def resolve() -> prompts.PromptHandle:
        with factory() as session:
            return prompts.resolve_for_predict(session, tenant_id, ref)

    return await run_in_threadpool(resolve)  # another tenant's prompt: 404 before anything is loaded


def _batching(predictor: Predictor) -> BatchingPredictor:
    if not isinstance(predictor, BatchingPredictor):
        raise Conflict("this server's predict path has no prompt cache to pin into", code="pin_unsupported")
    return predictor


@router.post("/v1/prompts/{prompt_ref}/pin", response_model=PinPublic)
async def pin_prompt(
    prompt_ref: str, tenant_id: TenantIdDep, factory: SessionFactoryDep, predictor: PredictorDep
) -> PinPublic:
    """Load the prompt now and keep it resident (409 when the pinned share of the cache is full)."""
    handle = await _handle(factory, tenant_id, prompt_ref)
    await _batching(predictor).pin(handle)
    return PinPublic(prompt=handle.ref, pinned=True)


@router.delete("/v1/prompts/{prompt_ref}/pin", response_model=PinPublic)
async def unpin_prompt(
    prompt_ref: str, tenant_id: TenantIdDep, factory: SessionFactoryDep, predictor: PredictorDep
) -> PinPublic:
    """Let the prompt be evicted again like any other (idempotent)."""
    handle = await _handle(factory, tenant_id, prompt_ref)
    _batching(predictor).unpin(handle)
    return PinPublic(prompt=handle.ref, pinned=False)
