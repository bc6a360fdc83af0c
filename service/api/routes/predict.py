"""`POST /v1/predict`: parse (JSON: base64 images or URLs; multipart), call the domain, shape the answer."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import PredictorDep, RateLimited, ResolverDep, SettingsDep, TenantIdDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES
from service.api.schemas.predict import PredictRequest, PredictResponse
from service.domain import predict as predict_domain
from service.domain.errors import InvalidInput
from service.domain.predict import ImageInput, ImageURL, PromptResult, URLFetchPolicy
from service.settings import Settings

router = APIRouter(route_class=CheckedRoute, tags=["predict"], responses=ERROR_RESPONSES)

#: JSON bodies above this are parsed and base64-decoded in a thread: a 30 MiB body takes ~300 ms of CPU,
#: which on the event loop would stall every other request; below it the thread hop costs more than it saves.
_INLINE_BODY_BYTES = 64 << 10

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "prompt": {"type": "string"},
        "prompts": {"type": "array", "items": {"type": "string"}},
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Image files; a text part holding an http(s) URL is fetched instead.",
        },
        "top_k": {"type": "integer", "default": 5},
    },
}


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    dependencies=[RateLimited],
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
    settings: SettingsDep,
    predictor: PredictorDep,
    resolver: ResolverDep,
    deadline_ms: Annotated[
        float | None,
        Header(
            alias="X-Request-Deadline-Ms",
            gt=0,
            description="Optional: answer within this many milliseconds or not at all. Rows that cannot "
            "start in time are dropped before they are computed: 504 `deadline_exceeded`.",
        ),
    ] = None,
) -> Response:
    deadline = None if deadline_ms is None else time.time() + deadline_ms / 1000
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
        deadline=deadline,
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


def _image(i: int, text: str) -> ImageInput:
    if text.startswith(("http://", "https://")):
        return ImageURL(text)
    try:
        return base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"images[{i}]: not valid base64 (nor an http(s) URL)", code="invalid_image", param=f"images[{i}]"
        ) from None


def _parse_json(raw: bytes) -> tuple[list[str], list[ImageInput], int, bool]:
    """Validation and base64 decoding of a JSON body (CPU-bound: big bodies come here in a thread)."""
    try:
        body = PredictRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
    if (body.prompt is None) == (body.prompts is None):
        raise InvalidInput("give exactly one of prompt and prompts", param="prompts")
    refs = body.prompts or [str(body.prompt)]
    return refs, [_image(i, t) for i, t in enumerate(body.images)], body.top_k, body.prompts is not None


def too_many_images(settings: Settings) -> InvalidInput:
    """One limit, one error, whatever the encoding (multipart files or JSON base64 strings)."""
    return InvalidInput(
        f"images: at most {settings.max_images_per_request} images per request",
        code="too_many_images",
        param="images",
    )


async def _parse(request: Request, settings: Settings) -> tuple[list[str], list[ImageInput], int, bool]:
    """(prompt refs, images, top_k, whether `prompts` was used) from either body kind, with limits."""
    content_type = request.headers.get("content-type", "")
    images: list[ImageInput]
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
        raw_k = form.get("top_k")
        try:
            top_k = int(raw_k) if isinstance(raw_k, str) and raw_k else 5
        except ValueError:
            raise InvalidInput("top_k: must be an integer", param="top_k") from None
        images = []
        for i, part in enumerate(form.getlist("images")):
            if isinstance(part, UploadFile):
                images.append(await part.read())
            elif part.startswith(("http://", "https://")):
                images.append(ImageURL(part))
            else:
                raise InvalidInput(
                    f"images[{i}]: a text part must be an http(s) URL",
                    code="invalid_image",
                    param=f"images[{i}]",
                )
    else:
        raw = await request.body()
        if len(raw) > _INLINE_BODY_BYTES:
            refs, images, top_k, several = await run_in_threadpool(_parse_json, raw)
        else:
            refs, images, top_k, several = _parse_json(raw)
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
