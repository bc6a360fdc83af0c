"""What the sync and async clients share: settings, retry policy, request bodies, reading SSE events."""

from __future__ import annotations

import io
import json
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from actprompt._errors import APIError, error_from_response
from actprompt.types import JobEvent, Prediction

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
#: Statuses worth another try: rate limited, or the service (or a proxy in front of it) briefly unavailable.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

ImageInput = Any  # str path | pathlib.Path | bytes | a PIL image | "https://..." URL


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("ACTPROMPT_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("ACTPROMPT_API_KEY") or None


def headers_for(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "actprompt-client/0.1", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, honouring Retry-After; only idempotent calls are retried."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 60.0)
        base = min(self.max_delay, self.initial_delay * (2**attempt))
        return base * (0.5 + random.random() / 2)


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise error_from_response(response.status_code, body, response.headers)


def is_retryable_error(error: APIError) -> bool:
    return error.status in RETRY_STATUSES


def new_idempotency_key() -> str:
    return f"actprompt-client-{uuid.uuid4().hex}"


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def image_bytes(image: ImageInput) -> bytes:
    """A path, raw bytes or a PIL image (encoded as PNG) → the bytes of an image file."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # a PIL image, without importing PIL
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"unsupported image {type(image).__name__}: use a path, bytes, a PIL image or a URL")


#: Names the prompt of a predict outside its body, so a balancer can route it to the replica that caches
#: that prompt without reading the body (deploy/haproxy.cfg hashes it; docs/DEPLOY.md). A hint only: the
#: server answers from the body's prompt whatever the header says.
PROMPT_HEADER = "X-Actprompt-Prompt"


def routing_headers(prompt: str) -> dict[str, str]:
    """The prompt header, when the reference can be a header value at all (else the server's 4xx says why)."""
    return {PROMPT_HEADER: prompt} if prompt.isascii() and prompt.isprintable() else {}


def predict_request(prompt: str, images: Sequence[ImageInput], top_k: int) -> dict[str, Any]:
    """httpx request kwargs: a multipart form, each image a file part or a text part holding its URL.

    One part list keeps the images in order (httpx sends a `(None, text)` entry as a plain text part). The
    prompt also goes in the routing header.
    """
    if not images:
        raise ValueError("at least one image")
    parts = [
        ("images", (None, im) if _is_url(im) else (f"image{i}", image_bytes(im), "application/octet-stream"))
        for i, im in enumerate(images)
    ]
    return {
        "data": {"prompt": prompt, "top_k": str(top_k)},
        "files": parts,
        "headers": routing_headers(prompt),
    }


def predictions(body: dict[str, Any]) -> list[list[Prediction]]:
    return [[Prediction.model_validate(p) for p in row] for row in body["predictions"]]


def event_from_sse(event: str, data: str) -> JobEvent:
    """A JobEvent from one SSE message; the closing `end` message becomes type `end` (id 0, final status)."""
    if event == "end":
        try:
            final = json.loads(data)
        except ValueError:
            final = None
        return JobEvent(
            id=0, type="end", message="stream ended", data=final if isinstance(final, dict) else None
        )
    return JobEvent.model_validate_json(data)
