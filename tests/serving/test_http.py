"""Serving through the gateway: batched predicts over HTTP, pins, deletion, several prompts, rate limits."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from bench.synthetic import random_lora_artifacts
from service.engine import Backbone, decode_image, preprocess
from service.engine.mixed_batch import predict_single
from tests.serving.gateway import ADMIN, Gateway, png_b64


def _probs(resp: Any) -> list[list[tuple[str, float]]]:
    assert resp.status_code == 200, resp.text
    return [[(p["label"], p["probability"]) for p in row] for row in resp.json()["predictions"]]


def _same(a: list[list[tuple[str, float]]], b: list[list[tuple[str, float]]]) -> None:
    assert [[lab for lab, _ in row] for row in a] == [[lab for lab, _ in row] for row in b]
    np.testing.assert_allclose(
        [[p for _, p in row] for row in a], [[p for _, p in row] for row in b], atol=1e-5
    )


def _metric(client: TestClient, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _mixed_passes(client: TestClient) -> float:
    """Forward passes that held more than one distinct prompt (the histogram's count above le=1)."""
    text = client.get("/metrics").text
    total = single = 0.0
    for line in text.splitlines():
        if line.startswith("actprompt_serving_batch_prompts_count"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("actprompt_serving_batch_prompts_bucket") and 'le="1.0"' in line:
            single += float(line.rsplit(" ", 1)[1])
    return total - single


def test_concurrent_tenants_get_what_sequential_requests_get(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=4, per_tenant=1)  # one prompt per tenant: two prompts = two tenants
    requests = [
        (t, {"prompt": pid, "images": [png_b64(i), png_b64(i + 1)][: 1 + i % 2], "top_k": 3})
        for i, (t, pid) in enumerate(gw.prompts * 6)
    ]
    sequential = [_probs(gw.predict(t, body)) for t, body in requests]
    batches_before = _metric(gw.client, "actprompt_serving_batch_rows_count")
    mixed_before = _mixed_passes(gw.client)
    with ThreadPoolExecutor(max_workers=12) as pool:
        concurrent = list(pool.map(lambda tb: _probs(gw.predict(*tb)), requests))
    for seq, con in zip(sequential, concurrent, strict=True):
        _same(seq, con)  # every row got its own tenant's answer, whatever pass it rode in
    batches = _metric(gw.client, "actprompt_serving_batch_rows_count") - batches_before
    assert 0 < batches < len(requests)
    assert _mixed_passes(gw.client) > mixed_before  # at least one pass mixed tenants
    assert _metric(gw.client, "actprompt_predict_requests_total{") >= 2 * len(requests)


def test_several_prompts_in_one_request(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=1, per_tenant=3)
    ids = [pid for _, pid in gw.prompts]
    images = [png_b64(7), png_b64(8)]
    r = gw.predict(0, {"prompts": ids, "images": images, "top_k": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["prompt"] for res in results] == [f"{pid}@1" for pid in ids]
    for pid, res in zip(ids, results, strict=True):
        single = _probs(gw.predict(0, {"prompt": pid, "images": images, "top_k": 2}))
        _same(single, [[(p["label"], p["probability"]) for p in row] for row in res["predictions"]])
    both = gw.predict(0, {"prompt": ids[0], "prompts": ids, "images": images})
    assert both.status_code == 422 and both.json()["error"]["param"] == "prompts"
    junk = base64.b64encode(b"not an image").decode()
    bad = gw.predict(0, {"prompts": ids, "images": [images[0], junk]})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_image" and bad.json()["error"]["param"] == "images[1]"


def test_pin_delete_and_isolation(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=2, per_tenant=1)
    (owner, pid), (other, _) = gw.prompts
    body = {"prompt": pid, "images": [png_b64(1)]}
    assert gw.predict(owner, body).status_code == 200
    foreign = gw.predict(other, body)
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "prompt_not_found"
    assert gw.client.post(f"/v1/prompts/{pid}/pin", headers=gw.tenants[other]).status_code == 404
    pinned = gw.client.post(f"/v1/prompts/{pid}/pin", headers=gw.tenants[owner])
    assert pinned.status_code == 200 and pinned.json() == {
        "object": "prompt_pin",
        "prompt": f"{pid}@1",
        "pinned": True,
    }
    cache = gw.client.app.state.predictor.engine.cache  # type: ignore[attr-defined]
    (key,) = [k for k in cache.pinned]
    assert key in cache
    assert gw.client.delete(f"/v1/prompts/{pid}", headers=gw.tenants[owner]).status_code == 204
    gone = gw.predict(owner, body)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "prompt_not_found"
    assert key not in cache and not cache.pinned  # dropped from every tier, pin included
    unpin = gw.client.delete(f"/v1/prompts/{pid}/pin", headers=gw.tenants[owner])
    assert unpin.status_code == 404


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_rate_limit_answers_429_with_retry_after(make_gateway: Callable[..., Gateway], backend: str) -> None:
    extra = {"rate_limit_redis_url": "redis://127.0.0.1:6379/0"} if backend == "redis" else {}
    gw = make_gateway(n_tenants=2, per_tenant=1, rate_limit_per_second=0.2, rate_limit_burst=2, **extra)
    (t0, p0), (t1, p1) = gw.prompts
    assert gw.predict(t0, {"prompt": p0, "images": [png_b64(1)]}).status_code == 200
    assert gw.predict(t0, {"prompt": p0, "images": [png_b64(1)]}).status_code == 200
    refused = gw.predict(t0, {"prompt": p0, "images": [png_b64(1)]})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited" and set(refused.json()["error"]) == {
        "code",
        "message",
        "param",
    }
    assert 1 <= int(refused.headers["Retry-After"]) <= 5
    assert gw.predict(t1, {"prompt": p1, "images": [png_b64(1)]}).status_code == 200  # buckets are per tenant


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Gateway overrides for the database: the fixture's own SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield {}
        return
    from service.db.migrate import upgrade
    from tests.api.conftest import fresh_pg_database

    with fresh_pg_database() as url:
        upgrade(url)
        yield {"database_url": url}


@contextlib.contextmanager
def sql_statements(engine: Any) -> Iterator[list[str]]:
    """Every SQL statement the engine runs meanwhile (SQLAlchemy's own event, no stand-in)."""
    from sqlalchemy import event

    statements: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", listener)


def test_revoked_key_stops_working_within_the_auth_cache_ttl(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=1, per_tenant=1, auth_cache_seconds=30.0)
    state = gw.client.app.state  # type: ignore[attr-defined]
    gw.client.portal.call(state.authenticator.aclose)  # type: ignore[union-attr]  # the plain TTL bound
    clock = Clock()
    state.authenticator.cache.clock = clock
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = {"prompt": gw.prompts[0][1], "images": [png_b64(1)]}
    tenant_id = gw.client.get("/v1/tenants", headers=admin).json()["data"][0]["id"]

    def new_key() -> tuple[str, dict[str, str]]:
        r = gw.client.post(f"/v1/tenants/{tenant_id}/keys", json={"name": "k"}, headers=admin)
        return r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}

    # revoked through this process: refused at once, whatever the cache held
    key_id, headers = new_key()
    assert gw.client.post("/v1/predict", json=body, headers=headers).status_code == 200
    assert gw.client.delete(f"/v1/keys/{key_id}", headers=admin).status_code == 204
    assert gw.client.post("/v1/predict", json=body, headers=headers).status_code == 401

    # revoked by another process (straight in the database): honoured once the TTL has passed
    key_id, headers = new_key()
    assert gw.client.post("/v1/predict", json=body, headers=headers).status_code == 200
    from service.domain.tenants import revoke_key

    with state.session_factory() as session:
        revoke_key(session, key_id)
        session.commit()
    clock.now += 29.0  # within the documented bound the remembered answer may still be used
    assert gw.client.post("/v1/predict", json=body, headers=headers).status_code == 200
    clock.now += 2.0
    refused = gw.client.post("/v1/predict", json=body, headers=headers)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_keys_in_use_are_revalidated_off_the_request_path(
    database: dict[str, str], make_gateway: Callable[..., Gateway]
) -> None:
    """Keys in use are checked ahead of expiry in one query: renewed while active (their requests then read
    no key after the TTL), dropped once revoked by another process (refused before the TTL)."""
    from service.domain.tenants import revoke_key

    gw = make_gateway(n_tenants=1, per_tenant=1, auth_cache_seconds=30.0, **database)
    state = gw.client.app.state  # type: ignore[attr-defined]
    authenticator = state.authenticator
    gw.client.portal.call(authenticator.aclose)  # type: ignore[union-attr]  # the test revalidates itself
    clock = Clock()
    authenticator.cache.clock = clock
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = {"prompt": gw.prompts[0][1], "images": [png_b64(1)]}
    tenant_id = gw.client.get("/v1/tenants", headers=admin).json()["data"][0]["id"]
    keys = [
        gw.client.post(f"/v1/tenants/{tenant_id}/keys", json={"name": "k"}, headers=admin).json()
        for _ in "ab"
    ]
    kept, revoked = ({"Authorization": f"Bearer {k['api_key']}"} for k in keys)

    def status(headers: dict[str, str]) -> int:
        return int(gw.client.post("/v1/predict", json=body, headers=headers).status_code)

    assert status(kept) == 200 and status(revoked) == 200  # read from the database at t = 0
    with state.session_factory() as session:
        revoke_key(session, keys[1]["id"])  # by another process: this one is not told
        session.commit()

    with sql_statements(state.session_factory.kw["bind"]) as statements:
        clock.now += 20.0
        assert status(kept) == 200 and status(revoked) == 200  # within the TTL: from memory
        statements.clear()
        renewed = gw.client.portal.call(authenticator.cache.revalidate)  # type: ignore[union-attr]
        assert renewed == 2  # the kept key and the fixture's own, used to import its prompts
        assert len(statements) == 1 and "api_keys" in statements[0]  # one query for every key in use
        assert status(revoked) == 401  # dropped: the revocation is seen 10 s before the TTL
        statements.clear()
        clock.now += 25.0  # 45 s after the kept key was read, 25 s after it was renewed
        assert status(kept) == 200
        assert not any("api_keys" in s for s in statements)  # never read afresh


def test_prompt_changes_reach_predict_within_the_resolve_ttl(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=1, per_tenant=2, prompt_resolve_cache_seconds=30.0)
    state = gw.client.app.state  # type: ignore[attr-defined]
    gw.client.portal.call(state.prompt_resolver.aclose)  # type: ignore[union-attr]  # the plain TTL bound
    clock = Clock()
    state.prompt_resolver.cache.clock = clock
    (_, p0), (_, p1) = gw.prompts
    headers = gw.tenants[0]
    assert gw.predict(0, {"prompt": p0, "images": [png_b64(1)]}).json()["prompt"] == f"{p0}@1"
    # a new version imported through this process: `prm_x` names it at once
    art = gw.client.get(f"/v1/prompts/{p1}/artifact", headers=headers).content
    files = {"artifact": ("a.safetensors", art, "application/octet-stream")}
    r = gw.client.post("/v1/prompts", files=files, data={"prompt_id": p0}, headers=headers)
    assert r.status_code == 201 and r.json()["version"] == 2
    assert gw.predict(0, {"prompt": p0, "images": [png_b64(1)]}).json()["prompt"] == f"{p0}@2"
    # deleted by another process (straight in the database): refused once the TTL has passed
    assert gw.predict(0, {"prompt": p1, "images": [png_b64(1)]}).status_code == 200
    from service.domain.prompts import delete_prompt

    with state.session_factory() as session:
        tenant_id = gw.client.get("/v1/tenants", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"][
            0
        ]["id"]
        delete_prompt(session, tenant_id, p1)
        session.commit()
    clock.now += 31.0
    gone = gw.predict(0, {"prompt": p1, "images": [png_b64(1)]})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "prompt_not_found"


def test_prompts_in_use_are_revalidated_off_the_request_path(
    database: dict[str, str], make_gateway: Callable[..., Gateway]
) -> None:
    """References in use are checked ahead of expiry with one light query: renewed while they name the same
    version (their requests then ask the database nothing after the TTL), dropped once they do not (a
    deletion by another process is then seen before the TTL); idle ones are left to expire."""
    from service.domain.prompts import delete_prompt

    gw = make_gateway(n_tenants=1, per_tenant=2, prompt_resolve_cache_seconds=30.0, **database)
    state = gw.client.app.state  # type: ignore[attr-defined]
    resolver = state.prompt_resolver
    gw.client.portal.call(resolver.aclose)  # type: ignore[union-attr]  # the test calls revalidate itself
    clock = Clock()
    resolver.cache.clock = clock
    (_, p0), (_, p1) = gw.prompts
    body = {"images": [png_b64(1)]}

    def status(prompt: str) -> int:
        return int(gw.predict(0, {**body, "prompt": prompt}).status_code)

    assert status(p0) == 200 and status(p1) == 200  # read from the database at t = 0
    admin = {"Authorization": f"Bearer {ADMIN}"}
    tenant_id = gw.client.get("/v1/tenants", headers=admin).json()["data"][0]["id"]
    with state.session_factory() as session:
        delete_prompt(session, tenant_id, p1)  # another process deletes p1: this one is not told
        session.commit()

    with sql_statements(state.session_factory.kw["bind"]) as statements:
        clock.now += 20.0
        assert status(p0) == 200 and status(p1) == 200  # within the TTL: from memory
        assert gw.client.portal.call(resolver.revalidate) == 1  # type: ignore[union-attr]
        assert len(statements) == 1 and "backbones" not in statements[0]  # one light query
        assert status(p1) == 404  # dropped: the deletion is seen 10 s before the TTL
        statements.clear()
        clock.now += 25.0  # 45 s after p0 was read, 25 s after it was renewed
        assert status(p0) == 200
        assert not any("backbones" in s for s in statements)  # never resolved afresh
        clock.now += 400.0  # idle past idle_s (and the TTL): not revalidated, left to expire
        statements.clear()
        assert gw.client.portal.call(resolver.revalidate) == 0  # type: ignore[union-attr]
        assert statements == []


class _Images(BaseHTTPRequestHandler):
    png = b""

    def do_GET(self) -> None:
        if self.path == "/slow.png":
            time.sleep(3)
        if self.path in ("/sign.png", "/slow.png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the gateway gave up on /slow.png: that is the point
                self.wfile.write(self.png)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    _Images.png = base64.b64decode(png_b64(5))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_predict_by_url(make_gateway: Callable[..., Gateway], image_server: str) -> None:
    gw = make_gateway(n_tenants=1, per_tenant=1, allow_private_urls=True, predict_url_timeout_s=0.5)
    (_, pid) = gw.prompts[0]
    by_bytes = _probs(gw.predict(0, {"prompt": pid, "images": [png_b64(5), png_b64(6)], "top_k": 3}))
    by_url = _probs(
        gw.predict(0, {"prompt": pid, "images": [f"{image_server}/sign.png", png_b64(6)], "top_k": 3})
    )
    _same(by_bytes, by_url)
    multipart = gw.client.post(
        "/v1/predict",
        data={"prompt": pid, "top_k": "3", "images": f"{image_server}/sign.png"},
        files=[("images", ("b.png", base64.b64decode(png_b64(6)), "image/png"))],
        headers=gw.tenants[0],
    )
    _same(by_bytes, _probs(multipart))
    for path, i in (("/missing.png", 1), ("/slow.png", 0)):
        images = [png_b64(1), f"{image_server}{path}"] if i else [f"{image_server}{path}"]
        bad = gw.predict(0, {"prompt": pid, "images": images})
        assert bad.status_code == 422, bad.text
        assert (
            bad.json()["error"]["code"] == "invalid_image" and bad.json()["error"]["param"] == f"images[{i}]"
        )
    not_url = gw.predict(0, {"prompt": pid, "images": ["ftp://example.org/a.png"]})
    assert not_url.status_code == 422 and not_url.json()["error"]["param"] == "images[0]"


def test_predict_url_refuses_private_addresses_by_default(
    make_gateway: Callable[..., Gateway], image_server: str
) -> None:
    gw = make_gateway(n_tenants=1, per_tenant=1)
    (_, pid) = gw.prompts[0]
    r = gw.predict(0, {"prompt": pid, "images": [f"{image_server}/sign.png"]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "images[0]"
    assert "non-public address" in r.json()["error"]["message"]


def test_metrics_and_readiness_when_the_database_is_down(
    make_gateway: Callable[..., Gateway], capfd: pytest.CaptureFixture[str]
) -> None:
    from service.db.session import make_engine, make_session_factory

    gw = make_gateway(n_tenants=1, per_tenant=1)
    (_, pid) = gw.prompts[0]
    assert gw.predict(0, {"prompt": pid, "images": [png_b64(1)]}).status_code == 200
    text = gw.client.get("/metrics").text
    assert 'actprompt_jobs{status="queued"} 0.0' in text and "actprompt_jobs_scrape_ok 1.0" in text
    assert 'tenant="-"' in text and "ten_" not in text  # no per-tenant series unless asked for
    state = gw.client.app.state  # type: ignore[attr-defined]
    state.session_factory = make_session_factory(
        make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1")
    )
    text = gw.client.get("/metrics").text
    assert "actprompt_jobs{" not in text  # absent, not zero
    assert "actprompt_jobs_scrape_ok 0.0" in text
    ready = gw.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "down"
    assert "readiness: database check failed: OperationalError" in capfd.readouterr().err  # says why


def test_per_tenant_metric_labels_are_opt_in(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=1, per_tenant=1, metrics_per_tenant=True)
    (_, pid) = gw.prompts[0]
    assert gw.predict(0, {"prompt": pid, "images": [png_b64(1)]}).status_code == 200
    assert 'tenant="ten_' in gw.client.get("/metrics").text


def test_a_lora_prompt_rides_the_mixed_pass_and_scores_as_the_engine(
    make_gateway: Callable[..., Gateway], resnet20: Backbone
) -> None:
    """A LoRA prompt and an AP prompt in one request (one pass): the LoRA rows equal its peft forward."""
    gw = make_gateway(n_tenants=1, per_tenant=1)
    (lora,) = random_lora_artifacts(resnet20, 1, rank=4, num_classes=5, seed=11, scale=0.05)
    files = {"artifact": ("lora.safetensors", lora.to_bytes(), "application/octet-stream")}
    r = gw.client.post("/v1/prompts", files=files, headers=gw.tenants[0])
    assert r.status_code == 201, r.text
    lora_id, (_, ap_id) = r.json()["id"], gw.prompts[0]
    images = [png_b64(3), png_b64(4), png_b64(5)]
    r = gw.predict(0, {"prompts": [ap_id, lora_id], "images": images, "top_k": 5})
    assert r.status_code == 200, r.text
    served = torch.zeros(len(images), 5)
    for row, preds in enumerate(r.json()["results"][1]["predictions"]):
        for p in preds:
            served[row, p["index"]] = p["probability"]
    pngs = [base64.b64decode(i) for i in images]
    x = preprocess(
        [decode_image(p) for p in pngs],
        resnet20.input_size,
        resnet20.spec.mean or (),
        resnet20.spec.std or (),
    )
    expected = torch.softmax(predict_single(resnet20, lora, x), dim=1)  # through the peft-injected copy
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)
    assert len({tuple(row.tolist()) for row in expected}) > 1  # not one constant answer
