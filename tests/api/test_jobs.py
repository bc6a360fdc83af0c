"""Job submission without running it (embedded worker off): validation, idempotency, pagination, cancel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import Api


@pytest.fixture
def qapi(make_api) -> Api:
    """Jobs stay `queued`: nothing consumes the queue."""
    api = make_api(embedded_worker=False, max_active_jobs_per_tenant=6)
    api.tiny_backbone()
    return api


def _err(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "param"}
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_bad_job_inputs(qapi: Api, tmp_path: Path) -> None:
    c, t = qapi.client, qapi.tenant()
    post = lambda **kw: c.post("/v1/jobs", json=qapi.job_body(**kw), headers=t)  # noqa: E731
    _err(post(prompt_layer=99), 422, "invalid_prompt_layer", "prompt_layer")
    _err(post(prompt_layer="no.such.module"), 422, "invalid_prompt_layer", "prompt_layer")
    _err(post(prompt_layer=[1, 99]), 422, "invalid_prompt_layer", "prompt_layer")
    _err(post(prompt_layer=True), 422, param="prompt_layer")
    _err(post(hyperparameters={"epochs": 0}), 422, param="hyperparameters.epochs")
    _err(post(hyperparameters={"learning_rate": -1}), 422, param="hyperparameters.learning_rate")
    _err(post(hyperparameters={"optimizer": "adam9"}), 422, param="hyperparameters.optimizer")
    _err(post(hyperparameters={"nope": 1}), 422, param="hyperparameters.nope")
    _err(post(prompt_shape="diagonal"), 422, param="prompt_shape")
    _err(post(surprise=1), 422, param="surprise")
    _err(post(method="full"), 422, "invalid_method", "method")  # not servable
    _err(post(method="linear", prompt_layer=2), 422, "invalid_prompt_layer", "prompt_layer")
    _err(post(backbone="nope"), 404, "backbone_not_found", "backbone")
    _err(post(prompt_id="prm_nope"), 404, "prompt_not_found", "prompt_id")
    _err(post(dataset_uri="ftp://example.com/x.npz"), 400, "invalid_dataset_uri", "dataset_uri")
    _err(post(dataset_uri="s3x:/x"), 400, "invalid_dataset_uri", "dataset_uri")
    outside = tmp_path / "outside.npz"
    outside.write_bytes(b"x")
    _err(post(dataset_uri=outside.as_uri()), 400, "invalid_dataset_uri", "dataset_uri")
    _err(
        post(dataset_uri=(Path(qapi.settings.data_roots) / ".." / "outside.npz").as_uri()),
        400,
        "invalid_dataset_uri",
    )
    _err(
        post(dataset_uri=(Path(qapi.settings.data_roots) / "missing.npz").as_uri()),
        400,
        "invalid_dataset_uri",
    )
    body = c.post("/v1/jobs", content=b"{not json", headers={**t, "Content-Type": "application/json"})
    _err(body, 400, "invalid_json")
    _err(c.post("/v1/jobs", json=[1, 2], headers=t), 422)
    _err(c.post("/v1/jobs", json={"dataset_uri": "x"}, headers=t), 422, "missing_field", "backbone")
    assert c.get("/v1/jobs", headers=t).json()["data"] == []  # nothing was created by any of these

    # the accepted forms of prompt_layer, resolved against the catalog
    layers = c.get("/v1/backbones/tiny", headers=t).json()["layers"]
    ok = post(prompt_layer=layers[2]["name"])
    assert ok.status_code == 202, ok.text
    assert ok.json()["resolved_layers"] == [2] and ok.json()["status"] == "validating"
    assert post(prompt_layer="all").json()["resolved_layers"] == [
        x["index"] for x in layers if x["kind"] == "block"
    ]
    auto = post(prompt_layer="auto").json()
    assert auto["prompt_layer"] == "auto" and auto["resolved_layers"] is None
    default = post().json()
    rec = next(x["index"] for x in layers if x["recommended"])
    assert default["resolved_layers"] == [rec] and default["hyperparameters"]["epochs"] == 4
    assert default["hyperparameters"]["optimizer"] == "adamw"  # defaults filled in
    linear = post(method="linear").json()
    assert linear["method"] == "linear" and linear["resolved_layers"] == []


def test_each_methods_config_refuses_options_it_does_not_take(qapi: Api) -> None:
    """Every servable method without prompt layers refuses `prompt_layer` and a non-default
    `prompt_shape` (its config class has neither); the default shape is accepted (sent uniformly)."""
    from service.engine.methods import get_method_class, list_methods

    c, t = qapi.client, qapi.tenant()
    post = lambda **kw: c.post("/v1/jobs", json=qapi.job_body(**kw), headers=t)  # noqa: E731
    without_layers = [
        m for m in list_methods(servable_only=True) if not get_method_class(m).uses_prompt_layers()
    ]
    assert {"linear", "input", "norm"} <= set(without_layers)
    for method in without_layers:
        _err(post(method=method, prompt_layer=2), 422, "invalid_prompt_layer", "prompt_layer")
        _err(post(method=method, prompt_layer="all"), 422, "invalid_prompt_layer", "prompt_layer")
        _err(post(method=method, prompt_shape="channel"), 422, "option_not_applicable", "prompt_shape")
        ok = post(method=method, prompt_shape="full")
        assert ok.status_code == 202 and ok.json()["resolved_layers"] == [], ok.text
    for method in ("activation", "deep_activation_norm"):
        ok = post(method=method, prompt_shape="channel", prompt_layer=2)
        assert ok.status_code == 202 and ok.json()["resolved_layers"] == [2], ok.text


def test_idempotency_key(qapi: Api) -> None:
    c = qapi.client
    a, b = qapi.tenant("a"), qapi.tenant("b")
    first = c.post("/v1/jobs", json=qapi.job_body(), headers={**a, "Idempotency-Key": "k1"})
    again = c.post("/v1/jobs", json=qapi.job_body(), headers={**a, "Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in first.headers
    _err(
        c.post("/v1/jobs", json=qapi.job_body(name="other"), headers={**a, "Idempotency-Key": "k1"}),
        409,
        "idempotency_key_reused",
    )
    other = c.post(
        "/v1/jobs", json=qapi.job_body(), headers={**b, "Idempotency-Key": "k1"}
    )  # keys are per tenant
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert len(c.get("/v1/jobs", headers=a).json()["data"]) == 1
    no_key = [c.post("/v1/jobs", json=qapi.job_body(), headers=a).json()["id"] for _ in range(2)]
    assert len(set(no_key)) == 2


def test_pagination_status_filter_cancel_and_quota(qapi: Api) -> None:
    c, t = qapi.client, qapi.tenant()
    ids = [c.post("/v1/jobs", json=qapi.job_body(name=f"j{i}"), headers=t).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = c.get(
            "/v1/jobs", params={"limit": 2, **({"after": cursor} if cursor else {})}, headers=t
        ).json()
        seen += [j["id"] for j in page["data"]]
        assert len(page["data"]) <= 2
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == list(reversed(ids))  # newest first, each once

    cancelled = c.post(f"/v1/jobs/{ids[1]}/cancel", headers=t)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert c.post(f"/v1/jobs/{ids[1]}/cancel", headers=t).json()["status"] == "cancelled"  # idempotent
    by_status = c.get("/v1/jobs", params={"status": "cancelled"}, headers=t).json()["data"]
    assert [j["id"] for j in by_status] == [ids[1]]
    assert len(c.get("/v1/jobs", params={"status": "validating"}, headers=t).json()["data"]) == 4
    _err(c.get("/v1/jobs", params={"status": "bogus"}, headers=t), 422, param="status")
    _err(c.get("/v1/jobs", params={"limit": 0}, headers=t), 422, param="limit")
    events = c.get(f"/v1/jobs/{ids[1]}/events", headers=t).json()["data"]
    assert [e["data"]["status"] for e in events if e["type"] == "state"] == ["validating", "cancelled"]
    assert c.get(f"/v1/jobs/{ids[1]}/checkpoints", headers=t).json()["data"] == []
    _err(c.get("/v1/jobs/job_nope", headers=t), 404, "job_not_found")

    # quota: 6 active jobs at most (4 queued now)
    for _ in range(2):
        assert c.post("/v1/jobs", json=qapi.job_body(), headers=t).status_code == 202
    _err(c.post("/v1/jobs", json=qapi.job_body(), headers=t), 429, "too_many_active_jobs")
    assert c.post("/v1/jobs", json=qapi.job_body(), headers=qapi.tenant("other")).status_code == 202
