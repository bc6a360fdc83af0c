"""`POST /v1/predict`: JSON with base64 images, or multipart files; one call to `app.state.predictor`."""

from __future__ import annotations

import base64
import binascii
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.batching import BatchingPredictor
from service.api.deps import PredictorDep, SessionFactoryDep, SettingsDep, TenantIdDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES
from service.api.schemas.predict import PredictionPublic, PredictRequest, PredictResponse, PromptPredictions
from service.db.session import retry_read
from service.domain import prompts
from service.domain.errors import DomainError, InvalidInput
from service.serving import metrics as serving_metrics
from service.serving.ratelimit import RateLimiter
from service.settings import Settings

log = logging.getLogger("actprompt.api")
router = APIRouter(route_class=CheckedRoute, tags=["predict"], responses=ERROR_RESPONSES)

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "prompt": {"type": "string"},
        "prompts": {"type": "array", "items": {"type": "string"}},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "default": 5},
    },
}


async def rate_limit(request: Request, tenant_id: TenantIdDep) -> None:
    """Per-tenant token bucket: 429 with `Retry-After` (whole seconds) while the tenant is over its rate."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    try:
        decision = await limiter.acquire(tenant_id)
    except Exception:  # the bucket store (Redis) is down: serving beats refusing everyone
        log.warning("rate limiter unavailable; request let through", exc_info=True)
        return
    if not decision.allowed:
        serving_metrics.RATE_LIMITED.labels(tenant=tenant_id).inc()
        raise StarletteHTTPException(
            429,
            detail=f"rate limit exceeded for this tenant; retry in {decision.retry_after_header} s",
            headers={"Retry-After": decision.retry_after_header},
        )


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(rate_limit)],
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
    refs, images, top_k, several = await _parse(request, settings)

    def resolve(session: Session) -> list[prompts.PromptHandle]:
        handles = []
        for i, ref in enumerate(refs):
            try:
                handles.append(prompts.resolve_for_predict(session, tenant_id, ref))
            except DomainError as exc:
                if several:
                    exc.param = f"prompts[{i}]"
                raise
        return handles

    handles = await run_in_threadpool(retry_read, factory, resolve)
    if isinstance(predictor, BatchingPredictor):
        per_prompt = await predictor.predict_many(handles, images, top_k, tenant_id=tenant_id)
    else:  # the simple per-request path: one prompt at a time
        per_prompt = [await predictor.predict(h, images, top_k) for h in handles]
    results = [
        PromptPredictions(
            prompt=h.ref,
            predictions=[
                [PredictionPublic(label=p.label, index=p.index, probability=p.probability) for p in row]
                for row in rows
            ],
        )
        for h, rows in zip(handles, per_prompt, strict=True)
    ]
    if several:
        return PredictResponse(results=results)
    return PredictResponse(prompt=results[0].prompt, predictions=results[0].predictions)


def too_many_images(settings: Settings) -> InvalidInput:
    """One limit, one error, whatever the encoding (multipart files or JSON base64 strings)."""
    return InvalidInput(
        f"images: at most {settings.max_images_per_request} images per request",
        code="too_many_images",
        param="images",
    )


async def _parse(request: Request, settings: Settings) -> tuple[list[str], list[bytes], int, bool]:
    """(prompt refs, image bytes, top_k, whether `prompts` was used) from either body kind, with limits."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(
                max_files=settings.max_images_per_request, max_fields=16 + settings.max_prompts_per_request
            )
        except StarletteHTTPException as exc:  # Starlette's own 400: the same 422 as the JSON body's
            if not str(exc.detail).startswith("Too many files"):
                raise
            raise too_many_images(settings) from None
        prompt = form.get("prompt")
        listed = [p for p in form.getlist("prompts") if isinstance(p, str) and p]
        if (not isinstance(prompt, str) or not prompt) and not listed:
            raise RequestValidationError(
                [{"loc": ("body", "prompt"), "msg": "Field required", "type": "missing"}]
            )
        several = bool(listed)
        refs = listed or [str(prompt)]
        if several and isinstance(prompt, str) and prompt:
            raise InvalidInput("give exactly one of prompt and prompts", param="prompts")
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
        if (body.prompt is None) == (body.prompts is None):
            raise InvalidInput("give exactly one of prompt and prompts", param="prompts")
        several = body.prompts is not None
        refs = body.prompts or [str(body.prompt)]
        top_k, images = body.top_k, []
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
        raise too_many_images(settings)
    if not 1 <= top_k <= settings.max_top_k:
        raise InvalidInput(f"top_k: between 1 and {settings.max_top_k}", param="top_k")
    if len(refs) > settings.max_prompts_per_request:
        raise InvalidInput(
            f"prompts: at most {settings.max_prompts_per_request} prompts per request", param="prompts"
        )
    return refs, images, top_k, several
