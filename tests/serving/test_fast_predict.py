"""A JSON predict from a remembered key skips FastAPI's router; it must answer exactly as the route does.

Each request goes twice: once with the process's key cache emptied (the key is unknown, so the request
takes FastAPI's route, which authenticates it against the database) and once right after, with the key
remembered (the fast path). Status, error body, headers that matter and predictions must agree.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.serving.gateway import ADMIN, Gateway, png_b64


def _twice(g: Gateway, body: Any, headers: dict[str, str]) -> tuple[httpx.Response, httpx.Response]:
    auth = g.client.app.state.authenticator  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}

    def post() -> httpx.Response:
        return g.client.post("/v1/predict", headers=headers, **kwargs)

    auth.cache.clear()
    routed = post()
    assert auth.cached(headers["Authorization"].split()[1]) is not None, "the route did not remember the key"
    return routed, post()


def _rounded(doc: Any) -> Any:
    """Probabilities of two passes agree to float error (a batch is laid out differently), not bit for bit."""
    if isinstance(doc, float):
        return round(doc, 5)
    if isinstance(doc, dict):
        return {k: _rounded(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_rounded(v) for v in doc]
    return doc


def _same(routed: httpx.Response, fast: httpx.Response) -> None:
    assert (fast.status_code, _rounded(fast.json())) == (routed.status_code, _rounded(routed.json()))
    for header in ("content-type", "retry-after", "www-authenticate"):
        assert fast.headers.get(header) == routed.headers.get(header), header
    assert fast.headers.get("x-request-id") and routed.headers.get("x-request-id")


CASES: dict[str, Callable[[list[str], list[str]], Any]] = {
    "one prompt": lambda own, _: {"prompt": own[0], "images": [png_b64(1), png_b64(2)], "top_k": 2},
    "several prompts": lambda own, _: {"prompts": own, "images": [png_b64(3)], "top_k": 3},
    "a data URL": lambda own, _: {"prompt": own[0], "images": ["data:image/png;base64," + png_b64(4)]},
    "another tenant's prompt": lambda _, other: {"prompt": other[0], "images": [png_b64(1)]},
    "an unknown prompt": lambda *_: {"prompt": "prm_doesnotexist", "images": [png_b64(1)]},
    "not base64": lambda own, _: {"prompt": own[0], "images": ["@@ not base64 @@"]},
    "not an image": lambda own, _: {"prompt": own[0], "images": [base64.b64encode(b"hello").decode()]},
    "no images": lambda own, _: {"prompt": own[0]},
    "prompt and prompts": lambda own, _: {"prompt": own[0], "prompts": own, "images": [png_b64(1)]},
    "top_k of 0": lambda own, _: {"prompt": own[0], "images": [png_b64(1)], "top_k": 0},
    "too many images": lambda own, _: {"prompt": own[0], "images": [png_b64(1)] * 65},
    "malformed JSON": lambda *_: '{"prompt": ',
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_fast_path_answers_as_the_route(case: str, make_gateway: Callable[..., Gateway]) -> None:
    g = make_gateway(n_tenants=2, per_tenant=2, max_images_per_request=64)
    own = [p for t, p in g.prompts if t == 0]
    other = [p for t, p in g.prompts if t == 1]
    routed, fast = _twice(g, CASES[case](own, other), g.tenants[0])
    _same(routed, fast)


def test_a_rate_limited_tenant_gets_the_same_429_on_both_paths(make_gateway: Callable[..., Gateway]) -> None:
    g = make_gateway(n_tenants=1, per_tenant=1, rate_limit_per_second=0.001, rate_limit_burst=1.0)
    body = {"prompt": g.prompts[0][1], "images": [png_b64(1)]}
    assert g.predict(0, body).status_code == 200  # the one token
    routed, fast = _twice(g, body, g.tenants[0])
    assert routed.status_code == 429
    _same(routed, fast)


def test_what_the_fast_path_leaves_to_the_route_is_answered(make_gateway: Callable[..., Gateway]) -> None:
    g = make_gateway(n_tenants=1, per_tenant=1)
    prompt = g.prompts[0][1]
    body = {"prompt": prompt, "images": [png_b64(1)]}
    assert g.predict(0, body).status_code == 200  # the key is remembered from here on
    deadline = g.client.post(
        "/v1/predict", json=body, headers={**g.tenants[0], "X-Request-Deadline-Ms": "soon"}
    )
    assert deadline.status_code == 422 and deadline.json()["error"]["param"] == "X-Request-Deadline-Ms"
    text = g.client.post("/v1/predict", content=b"{}", headers={**g.tenants[0], "Content-Type": "text/plain"})
    assert text.status_code == 415
    admin = g.client.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert admin.status_code == 403 and admin.json()["error"]["code"] == "tenant_key_required"
    files = {"images": ("a.png", base64.b64decode(png_b64(1)), "image/png")}
    multipart = g.client.post("/v1/predict", data={"prompt": prompt}, files=files, headers=g.tenants[0])
    assert multipart.status_code == 200 and multipart.json()["prompt"].startswith(prompt)
