"""Protocol details at the gateway's edge: one job per Idempotency-Key under
concurrency, the `Allow` header, one too-many-images error, 415 for a wrong Content-Type, 401 before any
body error, no `assert` as a runtime check."""

from __future__ import annotations

import ast
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from tests.api.conftest import Api, png_bytes, settings_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sqlite_api(sqlite_url: str, data_root: Path, tmp_path: Path) -> Iterator[Api]:
    """Checks that do not depend on the database engine run on SQLite only."""
    settings = settings_for(sqlite_url, data_root, tmp_path, embedded_worker=False)
    with TestClient(create_app(settings)) as client:
        yield Api(client=client, settings=settings)


# --- 1. concurrent requests with the same Idempotency-Key -------------------------------------------
def test_concurrent_requests_with_one_idempotency_key_all_get_the_one_job(api: Api) -> None:
    """Every caller gets the same job (200/202), whatever the interleaving; one row, one queued job."""
    api.tiny_backbone()
    tenant = api.tenant()
    headers = {**tenant, "Idempotency-Key": "race-1"}
    body = api.job_body(hyperparameters={"epochs": 1, "batch_size": 8})
    n = 16
    barrier = threading.Barrier(n)

    def submit(_: int) -> Any:
        barrier.wait()
        return api.client.post("/v1/jobs", json=body, headers=headers)

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(submit, range(n)))
    assert sorted({r.status_code for r in responses}) in ([202], [200, 202], [202, 200]), [
        (r.status_code, r.text[:200]) for r in responses if r.status_code not in (200, 202)
    ]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1, ids
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in responses) == 1
    listed = api.client.get("/v1/jobs", headers=tenant).json()["data"]
    assert [j["id"] for j in listed] == list(ids)


def test_same_idempotency_key_with_another_body_is_a_conflict(api: Api) -> None:
    api.tiny_backbone()
    tenant = {**api.tenant(), "Idempotency-Key": "k"}
    first = api.client.post("/v1/jobs", json=api.job_body(name="a"), headers=tenant)
    assert first.status_code == 202, first.text
    other = api.client.post("/v1/jobs", json=api.job_body(name="b"), headers=tenant)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


# --- 9. 405 names every method of the path -----------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/jobs", {"GET", "POST"}),
        ("DELETE", "/v1/jobs", {"GET", "POST"}),
        ("PUT", "/v1/tenants", {"GET", "POST"}),
        ("POST", "/v1/jobs/job_x", {"GET"}),
    ],
)
def test_405_allow_header_lists_every_method_of_the_path(
    sqlite_api: Api, method: str, path: str, allowed: set[str]
) -> None:
    r = sqlite_api.client.request(method, path)
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} == allowed
    assert r.json()["error"]["code"] == "method_not_allowed"


# --- 10. one image-count limit, one error, whatever the encoding -------------------------------------
def test_too_many_images_is_one_422_for_multipart_and_json(sqlite_api: Api) -> None:
    tenant = sqlite_api.tenant()
    limit = sqlite_api.settings.max_images_per_request
    png = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    import base64

    for count in (limit + 1, limit + 40):
        files = [("images", (f"{i}.png", io.BytesIO(png), "image/png")) for i in range(count)]
        multipart = sqlite_api.client.post(
            "/v1/predict", headers=tenant, data={"prompt": "prm_x"}, files=files
        )
        as_json = sqlite_api.client.post(
            "/v1/predict",
            headers=tenant,
            json={"prompt": "prm_x", "images": [base64.b64encode(png).decode()] * count},
        )
        for r in (multipart, as_json):
            assert r.status_code == 422, (count, r.text)
            error = r.json()["error"]
            assert (error["code"], error["param"]) == ("too_many_images", "images"), error
            assert str(limit) in error["message"]
    # At the limit the count is fine: the request gets past it (to the unknown prompt).
    files = [("images", (f"{i}.png", io.BytesIO(png), "image/png")) for i in range(limit)]
    r = sqlite_api.client.post("/v1/predict", headers=tenant, data={"prompt": "prm_x"}, files=files)
    assert r.status_code == 404, r.text


# --- 11. a wrong Content-Type is a 415 naming the expected type --------------------------------------
def test_wrong_content_type_on_json_endpoints_is_415(sqlite_api: Api) -> None:
    sqlite_api.tiny_backbone()
    tenant = sqlite_api.tenant()
    body = '{"backbone": "tiny", "dataset_uri": "file:///x.npz"}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        r = sqlite_api.client.post("/v1/jobs", content=body, headers={**tenant, "Content-Type": ctype})
        assert r.status_code == 415, (ctype, r.text)
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    predict_json = '{"prompt": "prm_x", "images": ["aGVsbG8="]}'
    r = sqlite_api.client.post(
        "/v1/predict", content=predict_json, headers={**tenant, "Content-Type": "text/plain"}
    )
    assert r.status_code == 415, r.text
    assert "multipart/form-data" in r.json()["error"]["message"]
    # The right types still work (JSON with a charset, and JSON predict reaches the prompt lookup).
    r = sqlite_api.client.post(
        "/v1/predict",
        content=predict_json,
        headers={**tenant, "Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "prompt_not_found", r.text
    r = sqlite_api.client.post(
        "/v1/tenants",
        content='{"name": "x"}',
        headers={**sqlite_api.admin, "Content-Type": "text/plain"},
    )
    assert r.status_code == 415


# --- 12. authenticate before the body is read --------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "content", "ctype"),
    [
        ("/v1/jobs", "{not json", "application/json"),
        ("/v1/jobs", '{"backbone": 3}', "application/json"),
        ("/v1/jobs", "{}", "text/plain"),
        ("/v1/predict", "{not json", "application/json"),
        ("/v1/tenants", "{not json", "application/json"),
    ],
)
def test_no_credentials_is_401_before_any_body_error(
    sqlite_api: Api, path: str, content: str, ctype: str
) -> None:
    for auth in ({}, {"Authorization": "Bearer wrong-key"}):
        r = sqlite_api.client.post(path, content=content, headers={"Content-Type": ctype, **auth})
        assert r.status_code == 401, (path, auth, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    # With a key the body's own error comes back (the check did not swallow it).
    key = sqlite_api.admin if path == "/v1/tenants" else sqlite_api.tenant(f"t{abs(hash(content))}")
    r = sqlite_api.client.post(path, content=content, headers={"Content-Type": ctype, **key})
    assert r.status_code in (400, 415, 422), r.text


# --- 15. no assert as a runtime check in product code ------------------------------------------------
def _is_type_narrowing(test: ast.expr) -> bool:
    """`x is not None` (or a conjunction of those): only tells mypy what construction already guarantees."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return all(_is_type_narrowing(v) for v in test.values)
    return (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.IsNot)
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value is None
    )


def test_product_code_has_no_assert_as_a_runtime_check() -> None:
    offenders = []
    for folder in ("service", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Assert) and not _is_type_narrowing(node.test):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], "asserts vanish under python -O; raise instead: " + ", ".join(offenders)
