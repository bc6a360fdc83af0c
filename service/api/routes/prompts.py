"""Prompts: list, get (`id` = latest, `id@version`), versions, artifact download, import (artifacts and
PEFT LoRA adapters), PEFT export, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from service.api.deps import (
    PageDep,
    PredictorDep,
    ReadTenantDep,
    ResolverDep,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    TrainTenantDep,
)
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES, ListPublic
from service.api.schemas.prompts import PromptPublic
from service.db.models import Prompt
from service.domain import peft_adapters, prompts
from service.domain import predict as predict_domain
from service.domain.errors import InvalidInput

router = APIRouter(route_class=CheckedRoute, tags=["prompts"], responses=ERROR_RESPONSES)


def prompt_public(p: Prompt) -> PromptPublic:
    return PromptPublic.model_validate(p)


@router.get("/v1/prompts", response_model=ListPublic[PromptPublic])
def list_prompts(tenant_id: ReadTenantDep, session: SessionDep, page: PageDep) -> ListPublic[PromptPublic]:
    rows = prompts.list_prompts(session, tenant_id, limit=page.fetch, after=page.after)
    return page.answer(rows, lambda p: p.prompt_id, prompt_public)


@router.post("/v1/prompts", status_code=201, response_model=PromptPublic)
async def import_prompt(
    tenant_id: TrainTenantDep,
    session: SessionDep,
    resolver: ResolverDep,
    settings: SettingsDep,
    artifact: Annotated[
        UploadFile | None,
        File(
            description="An artifact file from GET /v1/prompts/{id}/artifact, or a zip of a PEFT LoRA "
            "adapter folder (adapter_config.json + adapter_model.safetensors, with its head saved through "
            "modules_to_save), as GET /v1/prompts/{id}/peft writes it."
        ),
    ] = None,
    adapter_config: Annotated[
        UploadFile | None, File(description="A PEFT adapter's adapter_config.json (instead of a zip).")
    ] = None,
    adapter_model: Annotated[
        UploadFile | None, File(description="A PEFT adapter's adapter_model.safetensors (instead of a zip).")
    ] = None,
    backbone: Annotated[
        str | None,
        Form(max_length=64, description="PEFT adapters: the registered backbone it was trained on."),
    ] = None,
    classes: Annotated[
        str | None,
        Form(
            max_length=65536,
            description='PEFT adapters: class names in label order (a JSON array or "a,b,c"); default '
            "0, 1, ...",
        ),
    ] = None,
    name: Annotated[str | None, Form(max_length=200)] = None,
    prompt_id: Annotated[
        str | None, Form(max_length=40, description="Import as a new version of it.")
    ] = None,
) -> PromptPublic:
    from starlette.concurrency import run_in_threadpool

    data = await artifact.read() if artifact is not None else None
    config = await adapter_config.read() if adapter_config is not None else None
    weights = await adapter_model.read() if adapter_model is not None else None
    if data is None and config is None and weights is None:
        raise InvalidInput(
            "upload an artifact, a PEFT adapter zip, or adapter_config + adapter_model",
            code="missing_field",
            param="artifact",
        )

    def store() -> PromptPublic:
        if data is not None and not peft_adapters.is_adapter_zip(data):
            row = prompts.import_prompt(session, tenant_id, data, name=name, prompt_id=prompt_id)
        else:
            row = peft_adapters.import_adapter(
                session,
                tenant_id,
                settings,
                backbone_id=backbone,
                adapter_zip=data,
                adapter_config=config,
                adapter_model=weights,
                classes=classes,
                name=name,
                prompt_id=prompt_id,
            )
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


@router.get(
    "/v1/prompts/{prompt_ref}/peft",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "a PEFT LoRA adapter folder, zipped"}
    },
)
def download_peft(
    prompt_ref: str, tenant_id: ReadTenantDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """A LoRA prompt as PEFT writes an adapter: `adapter_config.json` + `adapter_model.safetensors` (the
    head under the timm classifier's name, listed in modules_to_save), for `PeftModel.from_pretrained`."""
    filename, data = peft_adapters.export_adapter(session, tenant_id, prompt_ref, settings)
    return Response(
        content=data,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
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
