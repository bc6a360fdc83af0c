"""The local multi-replica topology end to end: real PostgreSQL, Redis, S3 server (moto), HAProxy, 3 API
replicas, 2 workers, each a separate process.

A dataset uploaded through one replica lands in the object store and trains on a worker; predicts through
the balancer reach the replica that owns the prompt (the client's routing header, hashed with bounded
load), spill over when one prompt is hot, survive a replica killed under them, and a deleted prompt stops
being served by every replica within the prompt-resolve cache's TTL (ACTPROMPT_PROMPT_RESOLVE_CACHE_SECONDS,
default 5 s).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from actprompt import Client
from PIL import Image

from deploy.fleet import S3_BUCKET, S3_CREDENTIALS, Fleet
from tests.conftest import DATA_DIR, WEIGHTS_DIR
from tests.services import require

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

#: The documented bound on how long another replica may keep serving a deleted prompt (settings default).
RESOLVE_TTL_S = 5.0


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    require("postgres")
    require("redis")
    root = Path(tempfile.mkdtemp(prefix="actprompt-fleet-test-"))
    env = {
        "ACTPROMPT_RATE_LIMIT_PER_SECOND": "0",
        "ACTPROMPT_LEASE_SECONDS": "6",
        "ACTPROMPT_HEARTBEAT_SECONDS": "1",
        "ACTPROMPT_REAPER_INTERVAL_SECONDS": "2",
        "ACTPROMPT_PROGRESS_EVENT_SECONDS": "0.2",
    }
    fleet = Fleet(root, replicas=3, workers=2, extra_env=env)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tenant(fleet: Fleet) -> str:
    """A tenant and the ResNet-20 backbone, created through the balancer; the tenant's API key."""
    admin = {"Authorization": f"Bearer {fleet.admin_key}"}
    with httpx.Client(base_url=fleet.url, headers=admin, timeout=120) as c:
        key = c.post("/v1/tenants", json={"name": "fleet"}).raise_for_status().json()["api_key"]
        weights = (WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri()
        c.post("/v1/backbones", json={"id": "resnet20", "model": "resnet20_cifar", "weights": weights})
    return str(key)


def _dataset(path: Path) -> tuple[Path, bytes]:
    """A 10-class GTSRB slice (.npz) and one test image as PNG bytes."""
    with np.load(DATA_DIR / "gtsrb32.npz", allow_pickle=False) as z:
        x, y, classes = z["x_train"], z["y_train"].astype(np.int64), z["classes"]
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:20] for c in range(10)])
    np.savez(path, x_train=x[idx], y_train=y[idx], classes=classes[:10])
    buf = io.BytesIO()
    Image.fromarray(x[idx[0]]).save(buf, format="PNG")
    return path, buf.getvalue()


@pytest.fixture(scope="module")
def trained(fleet: Fleet, tenant: str) -> tuple[str, bytes]:
    """Upload through replica 1 only, train through the balancer on a worker: (prompt ref, an image)."""
    dataset, image = _dataset(fleet.root / "gtsrb10.npz")
    with Client(fleet.replica_url(1), tenant) as direct:
        file = direct.files.upload(dataset)
    s3 = boto3.client(
        "s3",
        endpoint_url=fleet.s3_url,
        region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    stored = s3.list_objects_v2(Bucket=S3_BUCKET).get("Contents", [])
    assert [o["Size"] for o in stored] == [dataset.stat().st_size], stored  # in the object store, whole
    with Client(fleet.url, tenant) as c:
        job = c.jobs.create(backbone="resnet20", dataset=file.id, hyperparameters={"epochs": 1})
        job = c.jobs.wait(job.id, poll=0.5)
    assert job.status == "succeeded", job.error
    assert job.worker_id and job.worker_id.startswith(("fleet1@", "fleet2@")), job.worker_id
    assert job.prompt
    return job.prompt, image


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def test_upload_on_one_replica_trains_on_a_worker_and_predicts_through_the_balancer(
    fleet: Fleet, tenant: str, trained: tuple[str, bytes]
) -> None:
    prompt, image = trained
    with Client(fleet.url, tenant) as c:
        rows = c.predict(prompt=prompt, images=[image], top_k=3)
    assert len(rows) == 1 and len(rows[0]) == 3


def test_predicts_of_one_prompt_go_to_one_replica_others_to_the_least_loaded(
    fleet: Fleet, tenant: str, trained: tuple[str, bytes]
) -> None:
    """The client's header routes every predict of a prompt to its home replica; without it, leastconn."""
    prompt, image = trained
    before = fleet.served("predict")
    with Client(fleet.url, tenant) as c:
        for _ in range(12):
            c.predict(prompt=prompt, images=[image], top_k=1)
    affine = _delta(before, fleet.served("predict"))
    assert sum(affine.values()) == 12, affine  # every one went through the hashing backend
    assert len(affine) == 1, f"one prompt, sequential predicts: one replica expected, got {affine}"

    before = fleet.served("api")
    auth = {"Authorization": f"Bearer {tenant}"}
    with httpx.Client(base_url=fleet.url, headers=auth, timeout=60) as raw:
        for _ in range(6):  # a client that does not send the header: served, by the least-loaded backend
            r = raw.post("/v1/predict", data={"prompt": prompt}, files=[("images", ("a.png", image))])
            assert r.status_code == 200, r.text
    assert sum(_delta(before, fleet.served("api")).values()) == 6


def test_a_hot_prompt_spills_over_to_more_replicas(
    fleet: Fleet, tenant: str, trained: tuple[str, bytes]
) -> None:
    """Bounded load: with many predicts of one prompt in flight, its home replica stops taking them all."""
    prompt, image = trained
    before = fleet.served("predict")
    errors: list[str] = []

    def client() -> None:
        with Client(fleet.url, tenant, max_retries=0) as c:
            for _ in range(8):
                try:
                    c.predict(prompt=prompt, images=[image] * 4, top_k=1)
                except Exception as exc:  # counted, and the test fails below naming it
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    spread = _delta(before, fleet.served("predict"))
    assert sum(spread.values()) == 72
    assert len(spread) >= 2, f"a hot prompt stayed on one replica: {spread}"
    assert max(spread.values()) < 72 * 0.9, spread


def test_a_deleted_prompt_stops_on_every_replica_within_the_resolve_ttl(
    fleet: Fleet, tenant: str, trained: tuple[str, bytes]
) -> None:
    prompt, image = trained
    auth = {"Authorization": f"Bearer {tenant}"}
    files = [("images", ("a.png", image))]
    replicas = [httpx.Client(base_url=fleet.replica_url(i), headers=auth, timeout=30) for i in (1, 2, 3)]
    try:
        for r in replicas:  # every replica has resolved (and cached) the prompt
            assert r.post("/v1/predict", data={"prompt": prompt}, files=files).status_code == 200
        with httpx.Client(base_url=fleet.url, headers=auth, timeout=30) as c:
            assert c.delete(f"/v1/prompts/{prompt}").status_code == 204
        t0 = time.monotonic()
        stopped: dict[int, float] = {}
        while len(stopped) < 3 and time.monotonic() - t0 < RESOLVE_TTL_S + 5:
            for i, r in enumerate(replicas, 1):
                if i not in stopped:
                    resp = r.post("/v1/predict", data={"prompt": prompt}, files=files)
                    assert resp.status_code in (200, 404), resp.text
                    if resp.status_code == 404:
                        assert resp.json()["error"]["code"] == "prompt_not_found"
                        stopped[i] = time.monotonic() - t0
            time.sleep(0.1)
    finally:
        for r in replicas:
            r.close()
    assert sorted(stopped) == [1, 2, 3], (
        f"still served after {RESOLVE_TTL_S + 5} s by some replica: {stopped}"
    )
    assert max(stopped.values()) <= RESOLVE_TTL_S + 1.5, stopped


class _CountingTransport(httpx.HTTPTransport):
    """Counts the predict requests sent on the wire: a call the client had to resend is sent twice."""

    def __init__(self, sent: list[float]) -> None:
        super().__init__()
        self.sent = sent

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/predict":
            self.sent.append(time.monotonic())
        return super().handle_request(request)


def test_a_killed_replica_fails_no_predict(fleet: Fleet, tenant: str) -> None:
    """SIGKILL the home replica of a prompt while 6 clients keep predicting: no predict fails, and HAProxy
    itself resends the ones in flight on it.

    HAProxy 2.6 resends a predict whose replica closed the connection before answering (`empty-response`).
    Two cases are left to the client, which resends them (a predict is idempotent): a request the dying
    replica had not read yet (the kernel resets such a connection, and HAProxy then closes the client's
    keep-alive connection without an answer, for the client to retry), and an answer cut off mid-way. They
    need the kill to land within a few microseconds of a request, so at most one shows up per run; without
    `empty-response`, every request in flight on the replica (2 to 3 here) would reach the clients."""
    from bench.synthetic import random_artifact
    from service.engine import BackboneSpec, create_backbone

    spec = BackboneSpec("resnet20_cifar", weights=(WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri())
    backbone = create_backbone(spec, "cpu")
    artifact = random_artifact(backbone, layers=[backbone.recommended_layer], num_classes=10, seed=7)
    auth = {"Authorization": f"Bearer {tenant}"}
    upload = {"artifact": ("p.safetensors", artifact.to_bytes(), "application/octet-stream")}
    with httpx.Client(base_url=fleet.url, headers=auth, timeout=60) as raw:
        prompt = raw.post("/v1/prompts", files=upload).raise_for_status().json()["id"]
    with Client(fleet.url, tenant, max_retries=0) as c:
        image = _dataset(fleet.root / "kill.npz")[1]
        before = fleet.served("predict")
        c.predict(prompt=prompt, images=[image], top_k=1)
        (home,) = _delta(before, fleet.served("predict"))

    errors: list[tuple[float, str]] = []
    done = threading.Event()
    answered: list[float] = []
    sent: list[float] = []

    def client() -> None:
        http = httpx.Client(base_url=fleet.url, headers=auth, timeout=60, transport=_CountingTransport(sent))
        with Client(fleet.url, http_client=http) as c:  # the shipped client, with its default retries
            while not done.is_set():
                try:
                    c.predict(prompt=prompt, images=[image], top_k=1)
                    answered.append(time.monotonic())
                except Exception as exc:
                    errors.append((time.monotonic(), repr(exc)))

    clients = 6
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    fleet.kill(home)
    time.sleep(4)
    done.set()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} predicts failed after {home} was killed: {errors[:3]}"
    resent_by_client = len(sent) - len(answered)
    assert resent_by_client <= 1, f"{resent_by_client} predicts came back to the clients"
    assert sum(t > killed_at + 1 for t in answered) >= 4, "no predict was answered after the kill"
    assert fleet.haproxy_stats()[("predict", home)]["status"].startswith("DOWN")
