"""Prompts: list, get (`id` = latest, `id@version`), versions, artifact download, import, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from service.api.deps import (
    PredictorDep,
    ReadTenantDep,
    ResolverDep,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    TrainTenantDep,
    page_limit,
    paginate,
)
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES, ListPublic
from service.api.schemas.prompts import PromptPublic
from service.db.models import Prompt
from service.domain import predict as predict_domain
from service.domain import prompts

router = APIRouter(route_class=CheckedRoute, tags=["prompts"], responses=ERROR_RESPONSES)


def prompt_public(p: Prompt) -> PromptPublic:
    return PromptPublic.model_validate(p)


@router.get("/v1/prompts", response_model=ListPublic[PromptPublic])
def list_prompts(
    tenant_id: ReadTenantDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: int = Query(20, ge=1, le=1000),
    after: str | None = Query(None, max_length=64),
) -> ListPublic[PromptPublic]:
    limit = page_limit(limit, settings)
    rows = prompts.list_prompts(session, tenant_id, limit=limit + 1, after=after)
    rows, has_more, cursor = paginate(rows, limit, lambda p: p.prompt_id)
    return ListPublic[PromptPublic](
        data=[prompt_public(p) for p in rows], has_more=has_more, next_cursor=cursor
    )


@router.post("/v1/prompts", status_code=201, response_model=PromptPublic)
async def import_prompt(
    tenant_id: TrainTenantDep,
    session: SessionDep,
    resolver: ResolverDep,
    artifact: Annotated[UploadFile, File(description="An artifact file from GET /v1/prompts/{id}/artifact.")],
    name: Annotated[str | None, Form(max_length=200)] = None,
    prompt_id: Annotated[
        str | None, Form(max_length=40, description="Import as a new version of it.")
    ] = None,
) -> PromptPublic:
    from starlette.concurrency import run_in_threadpool

    data = await artifact.read()

    def store() -> PromptPublic:
        row = prompts.import_prompt(session, tenant_id, data, name=name, prompt_id=prompt_id)
        session.commit()
        return prompt_public(row)

    stored = await run_in_threadpool(store)
    resolver.forget(tenant_id, stored.id)  # `prm_x` (latest) names the new version from now on
    return stored


@router.get("/v1/prompts/{prompt_ref}", response_model=PromptPublic)
def get_prompt(prompt_ref: str, tenant_id: ReadTenantDep, session: SessionDep) -> PromptPublic:
    return prompt_public(prompts.get_prompt(session, tenant_id, prompt_ref))


@router.get("/v1/prompts/{prompt_ref}/versions", response_model=ListPublic[PromptPublic])
def list_versions(prompt_ref: str, tenant_id: ReadTenantDep, session: SessionDep) -> ListPublic[PromptPublic]:
    rows = prompts.list_versions(session, tenant_id, prompt_ref)
    return ListPublic[PromptPublic](data=[prompt_public(p) for p in rows], has_more=False)


@router.get(
    "/v1/prompts/{prompt_ref}/artifact",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors bytes"}},
)
def download_artifact(prompt_ref: str, tenant_id: ReadTenantDep, session: SessionDep) -> Response:
    p = prompts.get_prompt(session, tenant_id, prompt_ref, with_artifact=True)
    return Response(
        content=p.artifact,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{p.prompt_id}@{p.version}.safetensors"',
            "ETag": f'"{p.sha256}"',
            "X-Content-SHA256": p.sha256,
        },
    )


@router.delete("/v1/prompts/{prompt_ref}", status_code=204)
async def delete_prompt(
    prompt_ref: str,
    tenant_id: TrainTenantDep,
    factory: SessionFactoryDep,
    resolver: ResolverDep,
    predictor: PredictorDep,
) -> Response:
    """`id` deletes every version; `id@version` deletes one. No cache serves them afterwards."""
    await predict_domain.delete_prompt(factory, resolver, predictor, tenant_id, prompt_ref)
    return Response(status_code=204)
