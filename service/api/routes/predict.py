"""`POST /v1/predict`: parse (JSON: base64 images or URLs; multipart), call the domain, shape the answer."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import PredictorDep, PredictTenantDep, RateLimited, ResolverDep, SettingsDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES
from service.api.schemas.predict import LIST_FIELDS, PredictRequest, PredictResponse
from service.domain import predict as predict_domain
from service.domain.errors import InvalidInput
from service.domain.predict import (
    ImageInput,
    ImageURL,
    Predictor,
    PromptResolver,
    PromptResult,
    URLFetchPolicy,
)
from service.settings import Settings

router = APIRouter(route_class=CheckedRoute, tags=["predict"], responses=ERROR_RESPONSES)

#: JSON bodies above this are parsed and base64-decoded in a thread: a 30 MiB body takes ~300 ms of CPU,
#: which on the event loop would stall every other request; below it the thread hop costs more than it saves.
_INLINE_BODY_BYTES = 64 << 10

#: (prompt refs, images, top_k, whether `prompts` was used): a predict body, parsed and within limits
Parsed = tuple[list[str], list[ImageInput], int, bool]


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
    deadline = deadline_after(deadline_ms)  # counted from here: parsing a big body spends it too
    parsed = await _parse(request, settings)
    return await answer(parsed, tenant_id, settings, predictor, resolver, deadline)


def deadline_after(deadline_ms: float | None) -> float | None:
    """The `time.time()` by which a request with `X-Request-Deadline-Ms` must be answered, if it has one."""
    return None if deadline_ms is None else time.time() + deadline_ms / 1000


async def answer(
    parsed: Parsed,
    tenant_id: str,
    settings: Settings,
    predictor: Predictor,
    resolver: PromptResolver,
    deadline: float | None,
) -> Response:
    """The domain's predict for a parsed body, shaped as the JSON answer (the route and the fast path)."""
    refs, images, top_k, several = parsed
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


def _validated(validate: Callable[[], PredictRequest]) -> Parsed:
    """Run the model's validation (its errors are the 422 of any body) and decode the images."""
    try:
        body = validate()
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
    refs = body.prompts or [str(body.prompt)]
    return refs, [_image(i, im) for i, im in enumerate(body.images)], body.top_k, body.prompts is not None


def _parse_json(raw: bytes) -> Parsed:
    """Validation and base64 decoding of a JSON body (CPU-bound: big bodies come here in a thread)."""
    return _validated(lambda: PredictRequest.model_validate_json(raw))


async def _parse_form(request: Request, settings: Settings) -> Parsed:
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


async def _parse(request: Request, settings: Settings) -> Parsed:
    """(prompt refs, images, top_k, whether `prompts` was used) from either body kind, with limits."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return _within_limits(await _parse_form(request, settings), settings)
    return await parse_json_body(await request.body(), settings)


async def parse_json_body(raw: bytes, settings: Settings) -> Parsed:
    """A JSON body, validated, base64-decoded (in a thread when big) and checked against the limits."""
    if len(raw) > _INLINE_BODY_BYTES:
        return _within_limits(await run_in_threadpool(_parse_json, raw), settings)
    return _within_limits(_parse_json(raw), settings)


def _within_limits(parsed: Parsed, settings: Settings) -> Parsed:
    refs, images, top_k, several = parsed
    if len(images) > settings.max_images_per_request:
        raise too_many_images(settings)
    if not 1 <= top_k <= settings.max_top_k:
        raise InvalidInput(f"top_k: between 1 and {settings.max_top_k}", param="top_k")
    if len(refs) > settings.max_prompts_per_request:
        raise InvalidInput(
            f"prompts: at most {settings.max_prompts_per_request} prompts per request", param="prompts"
        )
    return refs, images, top_k, several
