"""Admin calls: tenants, keys (hashed, revocable), backbones (catalog, conflicts, bad input)."""

from __future__ import annotations

from sqlalchemy import select

from service.db.models import ApiKey
from service.db.session import make_engine, make_session_factory
from service.domain.tenants import hash_key
from tests.api.conftest import TINY_BACKBONE, Api


def _error(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "param"}, body
    return body["error"]


def test_tenants_keys_and_auth(api: Api) -> None:
    c = api.client
    assert _error(c.get("/v1/jobs"))["code"] == "unauthorized"
    assert c.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401

    r = c.post("/v1/tenants", json={"name": "acme"}, headers=api.admin)
    assert r.status_code == 201
    created = r.json()
    key, tenant_id = created["api_key"], created["id"]
    tenant = {"Authorization": f"Bearer {key}"}
    assert c.get("/v1/jobs", headers=tenant).status_code == 200
    # tenant keys cannot do admin calls; the admin key is not a tenant
    assert _error(c.post("/v1/tenants", json={"name": "x"}, headers=tenant))["code"] == "admin_key_required"
    assert c.get("/v1/jobs", headers=api.admin).status_code == 403

    # only the hash is stored, with a visible prefix
    engine = make_engine(api.settings.database_url)
    with make_session_factory(engine)() as s:
        rows = list(s.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)))
    engine.dispose()
    assert (
        len(rows) == 1 and rows[0].key_hash == hash_key(key) and key not in (rows[0].key_hash, rows[0].prefix)
    )
    assert key.startswith(rows[0].prefix)

    r = c.post(f"/v1/tenants/{tenant_id}/keys", json={"name": "ci"}, headers=api.admin)
    assert r.status_code == 201
    second = r.json()
    listed = c.get(f"/v1/tenants/{tenant_id}/keys", headers=api.admin).json()["data"]
    assert {k["id"] for k in listed} == {created["key_id"], second["id"]} and all(
        "api_key" not in k for k in listed
    )
    assert c.delete(f"/v1/keys/{created['key_id']}", headers=api.admin).status_code == 204
    assert c.get("/v1/jobs", headers=tenant).status_code == 401
    assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {second['api_key']}"}).status_code == 200
    assert c.delete(f"/v1/keys/{created['key_id']}", headers=api.admin).status_code == 404
    assert (
        _error(c.post("/v1/tenants/ten_nope/keys", json={}, headers=api.admin))["code"] == "tenant_not_found"
    )
    assert c.post("/v1/tenants", json={"name": ""}, headers=api.admin).status_code == 422


def test_backbone_catalog_and_errors(api: Api) -> None:
    c = api.client
    tenant = api.tenant()
    r = c.post("/v1/backbones", json=TINY_BACKBONE, headers=api.admin)
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["input_size"] == [32, 32] and b["family"] == "cnn"
    layers = b["layers"]
    assert [layer["index"] for layer in layers] == list(range(len(layers))) and layers[0]["name"] == "input"
    assert sum(layer["recommended"] for layer in layers) == 1
    assert layers[b["recommended_layer"]]["recommended"]
    assert all(layer["full_params"] == _prod(layer["shape"]) for layer in layers)

    assert c.get("/v1/backbones/tiny", headers=tenant).json() == b
    assert [x["id"] for x in c.get("/v1/backbones", headers=tenant).json()["data"]] == ["tiny"]
    assert _error(c.post("/v1/backbones", json=TINY_BACKBONE, headers=api.admin))["code"] == "backbone_exists"
    assert c.post("/v1/backbones", json=TINY_BACKBONE, headers=tenant).status_code == 403
    err = _error(c.post("/v1/backbones", json={"id": "x", "model": "no_such_model_xyz"}, headers=api.admin))
    assert err["code"] == "invalid_backbone"
    r = c.post(
        "/v1/backbones", json={"id": "x", "model": "test_resnet", "weights": "ftp://w"}, headers=api.admin
    )
    assert r.status_code == 422 and _error(r)["param"] == "weights"
    r = c.post(
        "/v1/backbones",
        json={"id": "x", "model": "test_resnet", "weights": "file:///nonexistent.th"},
        headers=api.admin,
    )
    assert r.status_code == 422 and _error(r)["code"] == "invalid_backbone"
    assert _error(c.get("/v1/backbones/nope", headers=tenant))["code"] == "backbone_not_found"
    assert c.delete("/v1/backbones/tiny", headers=api.admin).status_code == 204
    assert c.get("/v1/backbones/tiny", headers=tenant).status_code == 404


def _prod(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
