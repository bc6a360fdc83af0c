"""Bad input is never a 500: every field of every body, query and path gets values of the wrong kind."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Api

BAD_VALUES: list[Any] = [
    None,
    True,
    -1,
    2**70,
    1e308,
    "",
    "x" * 5000,
    "\x00",
    "../../etc/passwd",
    [],
    [None],
    {},
    {"a": []},
]
BAD_SEGMENTS = [
    "x",
    "%00",
    "prm_" + "a" * 300,
    "job_..",
    "%2e%2e",
    "prm_x@0",
    "prm_x@-1",
    "prm_x@99999999999",
]


@pytest.fixture
def fapi(make_api) -> Api:
    api = make_api(embedded_worker=False)
    api.tiny_backbone()
    return api


def _ok(r) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"code", "message", "param"}, r.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_fuzzed_bodies_queries_and_paths(fapi: Api) -> None:
    c, t, a = fapi.client, fapi.tenant(), fapi.admin
    job = fapi.job_body()
    bodies: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
        "/v1/jobs": (job, t),
        "/v1/backbones": ({"id": "fz", "model": "test_resnet", "weights": "random"}, a),
        "/v1/tenants": ({"name": "fz"}, a),
        "/v1/predict": ({"prompt": "prm_x", "images": ["aGk="], "top_k": 1}, t),
    }
    for url, (body, headers) in bodies.items():
        for value in BAD_VALUES:
            _ok(c.post(url, json=value, headers=headers))
            for field in body:
                _ok(c.post(url, json={**body, field: value}, headers=headers))
        for field in ("epochs", "batch_size", "learning_rate", "optimizer", "val_fraction", "seed"):
            for value in BAD_VALUES:
                if url == "/v1/jobs":
                    _ok(c.post(url, json={**job, "hyperparameters": {field: value}}, headers=t))
        _ok(c.post(url, content=b"\xff\xfe{", headers={**headers, "Content-Type": "application/json"}))
        _ok(
            c.post(
                url,
                content=b"--x\r\n",
                headers={**headers, "Content-Type": "multipart/form-data; boundary=x"},
            )
        )
    for segment in BAD_SEGMENTS:
        for url in (
            f"/v1/jobs/{segment}",
            f"/v1/jobs/{segment}/events",
            f"/v1/jobs/{segment}/checkpoints",
            f"/v1/prompts/{segment}",
            f"/v1/prompts/{segment}/artifact",
            f"/v1/prompts/{segment}/versions",
            f"/v1/backbones/{segment}",
        ):
            _ok(c.get(url, headers=t))
        _ok(c.post(f"/v1/jobs/{segment}/cancel", headers=t))
        _ok(c.delete(f"/v1/prompts/{segment}", headers=t))
        _ok(c.delete(f"/v1/keys/{segment}", headers=a))
        _ok(c.post(f"/v1/tenants/{segment}/keys", json={}, headers=a))
        _ok(c.post("/v1/predict", json={"prompt": segment, "images": ["aGk="]}, headers=t))
    for query in ({"limit": "x"}, {"limit": -5}, {"limit": 10**9}, {"after": "\x00"}, {"status": ["a", "b"]}):
        _ok(c.get("/v1/jobs", params=query, headers=t))
        _ok(c.get("/v1/prompts", params=query, headers=t))
    for events_query in ({"after": "x"}, {"after": -1}, {"limit": 0}):
        _ok(c.get("/v1/jobs/job_x/events", params=events_query, headers=t))
    _ok(c.get("/v1/jobs/job_x/events", headers={**t, "Last-Event-ID": "nope", "Accept": "text/event-stream"}))
    _ok(c.post("/v1/prompts", files={"artifact": ("a", b"")}, headers=t))
    _ok(c.post("/v1/prompts", data={"name": "x"}, headers=t))
    _ok(c.get("/v1/jobs", headers={"Authorization": "Basic abc"}))
    _ok(c.get("/v1/jobs", headers={"Authorization": "Bearer " + "x" * 10000}))
