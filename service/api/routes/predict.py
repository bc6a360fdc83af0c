"""`POST /v1/predict`: parse (JSON: base64 images or URLs; multipart), call the domain, shape the answer."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import PredictorDep, PredictTenantDep, ResolverDep, SettingsDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES
from service.api.schemas.predict import LIST_FIELDS, PredictRequest, PredictResponse
from service.domain import predict as predict_domain
from service.domain.errors import InvalidInput
from service.domain.predict import ImageInput, ImageURL, PromptResult, URLFetchPolicy
from service.serving import metrics as serving_metrics
from service.serving.ratelimit import RateLimiter
from service.settings import Settings

router = APIRouter(route_class=CheckedRoute, tags=["predict"], responses=ERROR_RESPONSES)

#: JSON bodies above this are parsed and base64-decoded in a thread: a 30 MiB body takes ~300 ms of CPU,
#: which on the event loop would stall every other request; below it the thread hop costs more than it saves.
_INLINE_BODY_BYTES = 64 << 10


async def rate_limit(request: Request, tenant_id: PredictTenantDep) -> None:
    """Per-tenant token bucket: 429 with `Retry-After` (whole seconds) while the tenant is over its rate.

    The limiter never raises for its store: without Redis it limits per process (see serving.ratelimit).
    """
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    decision = await limiter.acquire(tenant_id)
    if not decision.allowed:
        serving_metrics.RATE_LIMITED.labels(tenant=serving_metrics.tenant_label(tenant_id)).inc()
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
                "multipart/form-data": {"schema": PredictRequest.model_json_schema()},
            },
        }
    },
)
async def predict(
    request: Request,
    tenant_id: PredictTenantDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    resolver: ResolverDep,
) -> Response:
    refs, images, top_k, several = await _parse(request, settings)
    results = await predict_domain.predict(
        resolver,
        predictor,
        tenant_id,
        refs,
        images,
        top_k,
        several=several,
        url_policy=URLFetchPolicy(
            max_bytes=settings.predict_url_max_bytes,
            timeout_s=settings.predict_url_timeout_s,
            allow_private=settings.allow_private_urls,
        ),
    )
    return Response(orjson.dumps(_shape(results, several)), media_type="application/json")


def _shape(results: list[PromptResult], several: bool) -> dict[str, object]:
    """The PredictResponse document, built directly (orjson encodes it; no per-row model objects)."""

    def rows(r: PromptResult) -> list[list[dict[str, object]]]:
        return [
            [{"label": p.label, "index": p.index, "probability": p.probability} for p in row]
            for row in r.rows
        ]

    if several:
        return {
            "object": "predictions",
            "results": [{"prompt": r.ref, "predictions": rows(r)} for r in results],
        }
    return {"object": "predictions", "prompt": results[0].ref, "predictions": rows(results[0])}


def _image(i: int, image: str | bytes) -> ImageInput:
    """A file part as it is; a string is an http(s) URL to fetch or a base64-encoded file."""
    if isinstance(image, bytes):
        return image
    if image.startswith(("http://", "https://")):
        return ImageURL(image)
    try:
        return base64.b64decode(
            image.split(",", 1)[-1] if image.startswith("data:") else image, validate=True
        )
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"images[{i}]: not valid base64 (nor an http(s) URL)", code="invalid_image", param=f"images[{i}]"
        ) from None


def _validated(validate: Callable[[], PredictRequest]) -> tuple[list[str], list[ImageInput], int, bool]:
    """Run the model's validation (its errors are the 422 of any body) and decode the images."""
    try:
        body = validate()
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
    refs = body.prompts or [str(body.prompt)]
    return refs, [_image(i, im) for i, im in enumerate(body.images)], body.top_k, body.prompts is not None


def _parse_json(raw: bytes) -> tuple[list[str], list[ImageInput], int, bool]:
    """Validation and base64 decoding of a JSON body (CPU-bound: big bodies come here in a thread)."""
    return _validated(lambda: PredictRequest.model_validate_json(raw))


async def _parse_form(request: Request, settings: Settings) -> tuple[list[str], list[ImageInput], int, bool]:
    """A multipart form, validated by the same model as a JSON body: file parts become `bytes`."""
    try:
        form = await request.form(
            max_files=settings.max_images_per_request, max_fields=16 + settings.max_prompts_per_request
        )
    except StarletteHTTPException as exc:  # Starlette's own 400: the same 422 as the JSON body's
        if not str(exc.detail).startswith("Too many files"):
            raise
        raise too_many_images(settings) from None
    fields: dict[str, object] = {}
    for name in form:
        values = [await v.read() if isinstance(v, UploadFile) else v for v in form.getlist(name)]
        fields[name] = values if name in LIST_FIELDS else values[0]
    return _validated(lambda: PredictRequest.model_validate(fields))


def too_many_images(settings: Settings) -> InvalidInput:
    """One limit, one error, whatever the encoding (multipart files or JSON base64 strings)."""
    return InvalidInput(
        f"images: at most {settings.max_images_per_request} images per request",
        code="too_many_images",
        param="images",
    )


async def _parse(request: Request, settings: Settings) -> tuple[list[str], list[ImageInput], int, bool]:
    """(prompt refs, images, top_k, whether `prompts` was used) from either body kind, with limits."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        refs, images, top_k, several = await _parse_form(request, settings)
    else:
        raw = await request.body()
        if len(raw) > _INLINE_BODY_BYTES:
            refs, images, top_k, several = await run_in_threadpool(_parse_json, raw)
        else:
            refs, images, top_k, several = _parse_json(raw)
    if len(images) > settings.max_images_per_request:
        raise too_many_images(settings)
    if not 1 <= top_k <= settings.max_top_k:
        raise InvalidInput(f"top_k: between 1 and {settings.max_top_k}", param="top_k")
    if len(refs) > settings.max_prompts_per_request:
        raise InvalidInput(
            f"prompts: at most {settings.max_prompts_per_request} prompts per request", param="prompts"
        )
    return refs, images, top_k, several
