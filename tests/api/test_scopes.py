"""API key scopes: every route of the app asks for one (a route added without a scope check fails here),
a key without it gets a typed 403 naming the scope, and keys are created with scopes, listed and revoked
(by the admin, or by a tenant key with the `admin` scope for its own tenant only)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.domain.tenants import Scope
from tests.api.conftest import Api

#: Routes anyone may call (probes, metrics, documentation, the console's page).
PUBLIC = {
    ("GET", "/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/console"),
    ("GET", "/console/"),
    ("GET", "/console/static/states.js"),
}
#: Routes only the admin key may call: no tenant key, whatever its scopes.
ADMIN_ONLY = {
    ("POST", "/v1/tenants"),
    ("GET", "/v1/tenants"),
    ("POST", "/v1/backbones"),
    ("DELETE", "/v1/backbones/{backbone_id}"),
}


def test_the_client_knows_every_scope() -> None:
    from actprompt.types import SCOPES

    assert set(SCOPES) == {s.value for s in Scope}


def expected_scope(method: str, path: str) -> Scope:
    """The documented rule: keys → admin, predict → predict, every other read → read, the rest → train."""
    if path.startswith(("/v1/tenants", "/v1/keys")):
        return Scope.ADMIN
    if path == "/v1/predict":
        return Scope.PREDICT
    return Scope.READ if method == "GET" else Scope.TRAIN


def app_routes(app: FastAPI) -> Iterator[tuple[str, str]]:
    """(method, path) of every route the app serves, however its routers were included."""

    def walk(routes: list[object], prefix: str) -> Iterator[tuple[str, str]]:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                yield from walk(included.routes, prefix + route.include_context.prefix)  # type: ignore[attr-defined]
            elif isinstance(route, APIRoute) or hasattr(route, "methods"):
                for method in sorted(getattr(route, "methods", None) or ()):
                    if method != "HEAD":
                        yield method, prefix + route.path  # type: ignore[attr-defined]

    yield from walk(list(app.router.routes), "")


def _key(api: Api, tenant_id: str, scopes: list[str], name: str = "k") -> dict[str, str]:
    r = api.client.post(
        f"/v1/tenants/{tenant_id}/keys", json={"name": name, "scopes": scopes}, headers=api.admin
    )
    assert r.status_code == 201, r.text
    assert r.json()["scopes"] == sorted(scopes)
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def _tenant(api: Api, name: str) -> str:
    r = api.client.post("/v1/tenants", json={"name": name}, headers=api.admin)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_every_route_asks_for_a_scope(api: Api) -> None:
    tenant = _tenant(api, "scoped")
    everything = _key(api, tenant, [s.value for s in Scope])
    lacking = {s: _key(api, tenant, [o.value for o in Scope if o != s], f"no-{s}") for s in Scope}
    seen = set()
    for method, path in app_routes(api.client.app):  # type: ignore[arg-type]
        seen.add((method, path))
        if (method, path) in PUBLIC:
            continue
        url = re.sub(
            r"\{(\w+)(:\w+)?\}", lambda m: tenant if m.group(1) == "tenant_id" else "x_missing", path
        )

        def call(headers: dict[str, str], method: str = method, url: str = url) -> tuple[int, str]:
            r = api.client.request(method, url, headers=headers)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            return r.status_code, str((body.get("error") or {}).get("code", ""))

        if (method, path) in ADMIN_ONLY:
            assert call(everything) == (403, "admin_key_required"), (method, path)
            continue
        denied = [s for s, headers in lacking.items() if call(headers) == (403, "insufficient_scope")]
        assert denied == [expected_scope(method, path)], f"{method} {path}: refused without {denied}"
        assert call(everything)[1] != "insufficient_scope", (method, path)
        assert call({})[0] == 401, (method, path)
    assert seen >= PUBLIC and seen >= ADMIN_ONLY  # the lists name real routes


def test_a_predict_only_key_and_the_403_it_gets(api: Api) -> None:
    tenant = _tenant(api, "app")
    predict_only = _key(api, tenant, ["predict"])
    r = api.client.get("/v1/jobs", headers=predict_only)
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["code"] == "insufficient_scope"
    assert error["message"].startswith("this API key lacks the 'read' scope (it holds: predict)")
    r = api.client.post("/v1/predict", json={"prompt": "prm_nope", "images": ["aGk="]}, headers=predict_only)
    assert r.status_code == 404 and r.json()["error"]["code"] == "prompt_not_found"  # past the scope check
    bad = api.client.post(f"/v1/tenants/{tenant}/keys", json={"scopes": ["everything"]}, headers=api.admin)
    assert bad.status_code == 422 and bad.json()["error"]["param"].startswith("scopes")


def test_keys_listed_and_revoked_by_the_admin_or_the_tenants_admin_key(api: Api) -> None:
    mine, theirs = _tenant(api, "mine"), _tenant(api, "theirs")
    manager = _key(api, mine, ["admin"], "manager")
    created = api.client.post(
        f"/v1/tenants/{mine}/keys", json={"name": "app", "scopes": ["predict"]}, headers=manager
    )
    assert created.status_code == 201 and created.json()["scopes"] == ["predict"]
    app_key = {"Authorization": f"Bearer {created.json()['api_key']}"}
    listed = api.client.get(f"/v1/tenants/{mine}/keys", headers=manager).json()["data"]
    assert {(k["name"], tuple(k["scopes"])) for k in listed} >= {
        ("app", ("predict",)),
        ("manager", ("admin",)),
    }
    # another tenant's keys are not found, as every foreign id is
    assert api.client.get(f"/v1/tenants/{theirs}/keys", headers=manager).status_code == 404
    their_key = api.client.get(f"/v1/tenants/{theirs}/keys", headers=api.admin).json()["data"][0]["id"]
    assert api.client.delete(f"/v1/keys/{their_key}", headers=manager).status_code == 404
    assert (
        api.client.get(f"/v1/tenants/{theirs}/keys", headers=api.admin).json()["data"][0]["revoked_at"]
        is None
    )
    # a key without `admin` manages nothing
    no = api.client.get(f"/v1/tenants/{mine}/keys", headers=app_key)
    assert no.status_code == 403 and no.json()["error"]["code"] == "insufficient_scope"
    # revoked: refused at once
    assert api.client.delete(f"/v1/keys/{created.json()['id']}", headers=manager).status_code == 204
    assert (
        api.client.post("/v1/predict", json={"prompt": "p", "images": ["aGk="]}, headers=app_key).status_code
        == 401
    )
    listed = api.client.get(f"/v1/tenants/{mine}/keys", headers=api.admin).json()["data"]
    assert next(k for k in listed if k["name"] == "app")["revoked_at"] is not None


@pytest.mark.parametrize("scopes", [["read"], ["train", "predict"]])
def test_the_key_a_tenant_is_created_with_holds_every_scope(api: Api, scopes: list[str]) -> None:
    r = api.client.post("/v1/tenants", json={"name": "full"}, headers=api.admin)
    first = r.json()
    keys = api.client.get(f"/v1/tenants/{first['id']}/keys", headers=api.admin).json()["data"]
    assert keys[0]["scopes"] == sorted(s.value for s in Scope)
    narrower = _key(api, first["id"], scopes)
    files = api.client.get("/v1/files", headers=narrower)
    assert (files.status_code == 200) == ("read" in scopes)
