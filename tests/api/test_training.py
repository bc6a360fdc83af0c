"""Training through the embedded runner, then prompts and predict; tenant isolation on every endpoint."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import timedelta

import numpy as np
import pytest

from service.db.base import utcnow
from service.db.repositories import JobLeaseRepository
from service.db.session import make_engine, make_session_factory
from tests.api.conftest import Api, make_images, png_bytes


@pytest.fixture
def trained(api: Api) -> tuple[Api, dict[str, str], dict]:
    api.tiny_backbone()
    tenant = api.tenant("owner")
    r = api.client.post("/v1/jobs", json=api.job_body(name="colours", metadata={"team": "x"}), headers=tenant)
    assert r.status_code == 202, r.text
    job = api.wait(r.json()["id"], tenant)
    assert job["status"] == "succeeded", job
    return api, tenant, job


def _images_b64(n_per_class: int = 3) -> tuple[list[str], np.ndarray]:
    x, y = make_images(n_per_class, seed=7)
    return [base64.b64encode(png_bytes(img)).decode() for img in x], y


def test_train_then_predict_and_manage_prompts(trained) -> None:
    api, t, job = trained
    c = api.client
    assert job["progress"]["fraction"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    assert job["validation_report"]["num_classes"] == 3 and job["metrics"]
    assert job["prompt"] == f"{job['prompt_id']}@1" and job["worker_id"].startswith("embedded-")
    events = c.get(f"/v1/jobs/{job['id']}/events", headers=t).json()["data"]
    states = [e["data"]["status"] for e in events if e["type"] == "state"]
    assert states == ["validating", "validating", "running", "succeeded"]
    assert {"validation", "epoch"} <= {e["type"] for e in events}
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    page = c.get(f"/v1/jobs/{job['id']}/events", params={"limit": 2}, headers=t).json()
    rest = c.get(f"/v1/jobs/{job['id']}/events", params={"after": page["next_cursor"]}, headers=t).json()
    assert [e["id"] for e in page["data"] + rest["data"]] == [e["id"] for e in events]
    checkpoints = c.get(f"/v1/jobs/{job['id']}/checkpoints", headers=t).json()["data"]
    assert 1 <= len(checkpoints) <= api.settings.checkpoints_keep and checkpoints[0]["epoch"] == 4

    # SSE on a finished job: every event, then `end`
    with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers={**t, "Accept": "text/event-stream"}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        text = "".join(s.iter_text())
    assert text.count("\nevent: ") + text.startswith("event: ") >= len(events) and "event: end" in text

    prompt = c.get(f"/v1/prompts/{job['prompt_id']}", headers=t).json()
    assert (
        prompt["version"] == 1
        and prompt["classes"] == ["red", "green", "blue"]
        and prompt["name"] == "colours"
    )
    assert prompt["backbone"] == "tiny" and prompt["job_id"] == job["id"] and prompt["size_bytes"] > 0
    art = c.get(f"/v1/prompts/{job['prompt']}/artifact", headers=t)
    assert art.status_code == 200 and hashlib.sha256(art.content).hexdigest() == prompt["sha256"]
    assert len(art.content) == prompt["size_bytes"]

    # predict: JSON with base64 and multipart give the same answer, far above chance on held-out images
    images, labels = _images_b64()
    r = c.post("/v1/predict", json={"prompt": job["prompt_id"], "images": images, "top_k": 2}, headers=t)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt"] == job["prompt"] and len(body["predictions"]) == len(images)
    assert all(len(p) == 2 and p[0]["probability"] >= p[1]["probability"] for p in body["predictions"])
    predicted = [p[0]["index"] for p in body["predictions"]]
    assert np.mean(np.asarray(predicted) == labels) >= 0.6
    files = [("images", (f"{i}.png", base64.b64decode(b), "image/png")) for i, b in enumerate(images[:2])]
    m = c.post("/v1/predict", data={"prompt": job["prompt"], "top_k": "2"}, files=files, headers=t)
    assert m.status_code == 200, m.text
    assert [p[0]["label"] for p in m.json()["predictions"]] == [
        p[0]["label"] for p in body["predictions"][:2]
    ]

    # bad predict inputs
    err = c.post(
        "/v1/predict",
        json={"prompt": job["prompt_id"], "images": [base64.b64encode(b"nope").decode()]},
        headers=t,
    )
    assert err.status_code == 422 and err.json()["error"]["code"] == "invalid_image"
    err = c.post("/v1/predict", json={"prompt": job["prompt_id"], "images": ["***"]}, headers=t)
    assert err.status_code == 422 and err.json()["error"]["param"] == "images[0]"
    bad_file = c.post(
        "/v1/predict",
        data={"prompt": job["prompt_id"]},
        files=[("images", ("x.png", b"zz", "image/png"))],
        headers=t,
    )
    assert bad_file.status_code == 422
    assert (
        c.post("/v1/predict", json={"prompt": job["prompt_id"], "images": []}, headers=t).status_code == 422
    )
    assert (
        c.post(
            "/v1/predict", json={"prompt": job["prompt_id"], "images": images[:1], "top_k": 999}, headers=t
        ).status_code
        == 422
    )
    assert (
        c.post("/v1/predict", json={"prompt": "prm_nope", "images": images[:1]}, headers=t).status_code == 404
    )
    assert (
        c.post(
            "/v1/predict", json={"prompt": f"{job['prompt_id']}@9", "images": images[:1]}, headers=t
        ).status_code
        == 404
    )
    big = c.post(
        "/v1/predict",
        content=b"x" * (api.settings.max_upload_bytes + 1),
        headers={**t, "Content-Type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"

    # import: a new prompt, and a new version of the existing one
    imported = c.post(
        "/v1/prompts", files={"artifact": ("a.safetensors", art.content)}, data={"name": "copy"}, headers=t
    )
    assert imported.status_code == 201, imported.text
    assert (
        imported.json()["id"] != job["prompt_id"]
        and imported.json()["imported"]
        and imported.json()["sha256"] == prompt["sha256"]
    )
    v2 = c.post(
        "/v1/prompts",
        files={"artifact": ("a.safetensors", art.content)},
        data={"prompt_id": job["prompt_id"]},
        headers=t,
    )
    assert v2.status_code == 201 and v2.json()["version"] == 2
    assert c.get(f"/v1/prompts/{job['prompt_id']}", headers=t).json()["version"] == 2
    assert [
        p["version"] for p in c.get(f"/v1/prompts/{job['prompt_id']}/versions", headers=t).json()["data"]
    ] == [2, 1]
    latest = c.post("/v1/predict", json={"prompt": job["prompt_id"], "images": images[:1]}, headers=t).json()
    assert latest["prompt"] == f"{job['prompt_id']}@2"
    garbage = c.post("/v1/prompts", files={"artifact": ("a.bin", b"garbage" * 10)}, headers=t)
    assert garbage.status_code == 422 and garbage.json()["error"]["code"] == "invalid_artifact"
    listed = c.get("/v1/prompts", headers=t).json()["data"]
    assert sorted(p["id"] for p in listed) == sorted([job["prompt_id"], imported.json()["id"]])

    # the backbone is in use
    assert c.delete("/v1/backbones/tiny", headers=api.admin).status_code == 409
    assert c.delete(f"/v1/prompts/{job['prompt_id']}@2", headers=t).status_code == 204
    assert c.get(f"/v1/prompts/{job['prompt_id']}", headers=t).json()["version"] == 1
    assert c.delete(f"/v1/prompts/{job['prompt_id']}", headers=t).status_code == 204
    assert c.get(f"/v1/prompts/{job['prompt_id']}", headers=t).status_code == 404
    assert (
        c.post("/v1/predict", json={"prompt": job["prompt_id"], "images": images[:1]}, headers=t).status_code
        == 404
    )

    # metrics count requests and jobs by state
    text = c.get("/metrics").text
    assert 'actprompt_jobs{status="succeeded"} 1.0' in text
    assert 'actprompt_http_requests_total{method="POST",route="/v1/predict",status="200"}' in text


def test_tenant_isolation_on_every_endpoint(trained) -> None:
    api, owner, job = trained
    c = api.client
    other = api.tenant("intruder")
    jid, pid = job["id"], job["prompt_id"]
    art = c.get(f"/v1/prompts/{pid}/artifact", headers=owner).content
    images, _ = _images_b64(1)
    calls = [
        ("GET", f"/v1/jobs/{jid}", {}),
        ("POST", f"/v1/jobs/{jid}/cancel", {}),
        ("GET", f"/v1/jobs/{jid}/events", {}),
        ("GET", f"/v1/jobs/{jid}/checkpoints", {}),
        ("GET", f"/v1/prompts/{pid}", {}),
        ("GET", f"/v1/prompts/{job['prompt']}", {}),
        ("GET", f"/v1/prompts/{pid}/versions", {}),
        ("GET", f"/v1/prompts/{pid}/artifact", {}),
        ("DELETE", f"/v1/prompts/{pid}", {}),
        ("POST", "/v1/predict", {"json": {"prompt": pid, "images": images}}),
        ("POST", "/v1/jobs", {"json": api.job_body(prompt_id=pid)}),
        ("POST", "/v1/prompts", {"files": {"artifact": ("a", art)}, "data": {"prompt_id": pid}}),
    ]
    for method, url, kwargs in calls:
        r = c.request(method, url, headers=other, **kwargs)
        assert r.status_code == 404, (method, url, r.status_code, r.text)
        assert r.json()["error"]["code"].endswith("_not_found"), r.text
        assert (
            "red" not in r.text and "tiny.npz" not in r.text and "colours" not in r.text
        )  # none of its data
    sse = c.get(f"/v1/jobs/{jid}/events", headers={**other, "Accept": "text/event-stream"})
    assert sse.status_code == 404
    assert c.get("/v1/jobs", headers=other).json()["data"] == []
    assert c.get("/v1/prompts", headers=other).json()["data"] == []
    # and the owner still has everything
    assert c.get(f"/v1/jobs/{jid}", headers=owner).json()["status"] == "succeeded"
    assert c.get(f"/v1/prompts/{pid}", headers=owner).status_code == 200


def test_cancel_running_job(api: Api) -> None:
    api.tiny_backbone()
    t = api.tenant()
    body = api.job_body(hyperparameters={"epochs": 500, "batch_size": 4})
    job_id = api.client.post("/v1/jobs", json=body, headers=t).json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = api.client.get(f"/v1/jobs/{job_id}", headers=t).json()
        if job["status"] == "running" and job["progress"]["fraction"] > 0:
            break
        time.sleep(0.05)
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=t)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    job = api.wait(job_id, t)
    assert job["status"] == "cancelled"  # 500 epochs: without the cancel it would have succeeded
    assert job["prompt_id"] is None and job["progress"]["fraction"] < 1
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=t).json()["status"] == "cancelled"
    states = [
        e["data"]["status"]
        for e in api.client.get(f"/v1/jobs/{job_id}/events", headers=t).json()["data"]
        if e["type"] == "state"
    ]
    assert states[-2:] == ["cancelling", "cancelled"]


def test_restart_picks_up_queued_job(make_api) -> None:
    first = make_api(embedded_worker=False)
    first.tiny_backbone()
    t = first.tenant()
    job_id = first.client.post("/v1/jobs", json=first.job_body(), headers=t).json()["id"]
    crashed_id = first.client.post("/v1/jobs", json=first.job_body(), headers=t).json()["id"]
    # the second job was running when the process died: its lease is still "alive" for a long time
    engine = make_engine(first.settings.database_url)
    with make_session_factory(engine)() as s:
        now = utcnow()
        assert JobLeaseRepository(s).claim(crashed_id, "embedded-old-pid", now, now + timedelta(hours=1))
        s.commit()
    engine.dispose()
    assert not first.client.app.state.queue.run_jobs  # type: ignore[attr-defined]
    waiting = first.client.get(f"/v1/jobs/{job_id}", headers=t).json()
    assert waiting["status"] == "validating" and waiting["attempts"] == 0 and waiting["worker_id"] is None
    first.client.__exit__(None, None, None)  # the process "stops" with one job queued and one running
    second = make_api()  # same database, embedded worker on
    job = second.wait(job_id, t)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    crashed = second.wait(crashed_id, t)
    assert (
        crashed["status"] == "succeeded"
        and crashed["attempts"] == 2
        and crashed["worker_id"] != "embedded-old-pid"
    )


def test_auto_layer_records_the_sweep(api: Api) -> None:
    api.tiny_backbone()
    t = api.tenant()
    body = api.job_body(prompt_layer="auto", hyperparameters={"epochs": 2, "batch_size": 8})
    job = api.wait(api.client.post("/v1/jobs", json=body, headers=t).json()["id"], t)
    assert job["status"] == "succeeded", job
    assert job["prompt_layer"] == "auto" and len(job["resolved_layers"]) == 1
    sweep = [
        e
        for e in api.client.get(f"/v1/jobs/{job['id']}/events", headers=t).json()["data"]
        if e["type"] == "layer_search"
    ]
    chosen = [e for e in sweep if "layer" in (e["data"] or {})]
    assert chosen and chosen[-1]["data"]["layer"] == job["resolved_layers"][0] and chosen[-1]["data"]["sweep"]
    prompt = api.client.get(f"/v1/prompts/{job['prompt_id']}", headers=t).json()
    assert prompt["prompt_layer"] == job["resolved_layers"]


def test_sse_streams_a_live_job_to_its_end(api: Api) -> None:
    """The stream is live: `running` arrives while the job still runs (a cancel sent then ends it)."""
    api.tiny_backbone()
    t = api.tenant()
    long_job = api.job_body(hyperparameters={"epochs": 500, "batch_size": 4})
    job_id = api.client.post("/v1/jobs", json=long_job, headers=t).json()["id"]
    events: list[tuple[str, str]] = []
    status_when_running_streamed = None
    with api.client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={**t, "Accept": "text/event-stream"}
    ) as s:
        kind = ""
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, line[6:]))
                if kind == "state" and '"running"' in line and status_when_running_streamed is None:
                    status_when_running_streamed = api.client.get(f"/v1/jobs/{job_id}", headers=t).json()[
                        "status"
                    ]
                    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=t).status_code == 200
    kinds = [k for k, _ in events]
    assert status_when_running_streamed == "running"
    # a stream replayed after the end would show "succeeded" (500 epochs): it ended by the cancel sent live
    assert kinds[-1] == "end" and '"cancelled"' in events[-1][1]
    states = [json.loads(d)["data"]["status"] for k, d in events if k == "state"]
    assert states[:3] == ["validating", "validating", "running"] and states[-1] == "cancelled"
    # resuming with Last-Event-ID sends only what came after
    with api.client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={**t, "Accept": "text/event-stream", "Last-Event-ID": "1"}
    ) as s:
        resumed = [line for line in s.iter_lines() if line.startswith("id: ")]
    assert resumed and all(int(line[4:]) > 1 for line in resumed)
