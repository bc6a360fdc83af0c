"""`POST /v1/predict`: JSON with base64 images, or multipart files; one call to `app.state.predictor`."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.deps import PredictorDep, SessionFactoryDep, SettingsDep, TenantIdDep
from service.api.schemas.common import ERROR_RESPONSES
from service.api.schemas.predict import PredictionPublic, PredictRequest, PredictResponse
from service.domain import prompts
from service.domain.errors import InvalidInput
from service.settings import Settings

router = APIRouter(tags=["predict"], responses=ERROR_RESPONSES)

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["prompt", "images"],
    "properties": {
        "prompt": {"type": "string"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "default": 5},
    },
}


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": PredictRequest.model_json_schema()},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
    },
)
async def predict(
    request: Request,
    tenant_id: TenantIdDep,
    factory: SessionFactoryDep,
    settings: SettingsDep,
    predictor: PredictorDep,
) -> PredictResponse:
    ref, images, top_k = await _parse(request, settings)

    def resolve() -> prompts.PromptHandle:
        with factory() as session:
            return prompts.resolve_for_predict(session, tenant_id, ref)

    handle = await run_in_threadpool(resolve)
    rows = await predictor.predict(handle, images, top_k)
    return PredictResponse(
        prompt=handle.ref,
        predictions=[
            [PredictionPublic(label=p.label, index=p.index, probability=p.probability) for p in row]
            for row in rows
        ],
    )


async def _parse(request: Request, settings: Settings) -> tuple[str, list[bytes], int]:
    """(prompt ref, image bytes, top_k) from either body kind, with the request limits applied."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=16)
        prompt = form.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestValidationError(
                [{"loc": ("body", "prompt"), "msg": "Field required", "type": "missing"}]
            )
        files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        raw_k = form.get("top_k")
        try:
            top_k = int(raw_k) if isinstance(raw_k, str) and raw_k else 5
        except ValueError:
            raise InvalidInput("top_k: must be an integer", param="top_k") from None
        images = [await f.read() for f in files]
    else:
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
        prompt, top_k, images = body.prompt, body.top_k, []
        for i, text in enumerate(body.images):
            try:
                images.append(
                    base64.b64decode(
                        text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True
                    )
                )
            except (binascii.Error, ValueError):
                raise InvalidInput(
                    f"images[{i}]: not valid base64", code="invalid_image", param=f"images[{i}]"
                ) from None
    if not images:
        raise InvalidInput("images: at least one image is required", param="images")
    if len(images) > settings.max_images_per_request:
        raise InvalidInput(
            f"images: at most {settings.max_images_per_request} images per request", param="images"
        )
    if not 1 <= top_k <= settings.max_top_k:
        raise InvalidInput(f"top_k: between 1 and {settings.max_top_k}", param="top_k")
    return prompt, images, top_k
