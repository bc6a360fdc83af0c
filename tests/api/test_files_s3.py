"""Uploads in S3 through the gateway (moto's standalone server on 127.0.0.1, a real uvicorn for the outage):
upload, train, evaluate and delete with no local files folder; an object store that stops answering mid-upload
is a 503 that leaves nothing behind; `s3://` dataset URIs only inside the operator's allowed prefixes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from tests.api.conftest import Api, settings_for
from tests.api.serve import serve_in_thread
from tests.api.test_files import folder_zip, upload
from tests.conftest import PrivateS3, new_bucket, s3_client

MIB = 1 << 20


@contextlib.contextmanager
def s3_api(tmp_path: Path, data_root: Path, endpoint: str, bucket: str, **overrides: Any) -> Iterator[Api]:
    settings = settings_for(
        f"sqlite:///{tmp_path / 'actprompt.db'}",
        data_root,
        tmp_path,
        storage_url=f"s3://{bucket}/uploads",
        s3_endpoint_url=endpoint,
        s3_region="us-east-1",
        storage_part_bytes=5 * MIB,
        **overrides,
    )
    with TestClient(create_app(settings)) as client:
        yield Api(client=client, settings=settings)


def _keys(bucket: str, url: str) -> list[str]:
    return [o["Key"] for o in s3_client(url).list_objects_v2(Bucket=bucket).get("Contents", [])]


def wait_evaluation(api: Api, evaluation_id: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        ev: dict[str, Any] = api.client.get(f"/v1/evaluations/{evaluation_id}", headers=headers).json()
        if ev["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return ev
        time.sleep(0.1)


@pytest.mark.slow
def test_upload_to_s3_train_evaluate_delete_with_no_local_files(
    s3_url: str, s3_bucket: str, tmp_path: Path, data_root: Path
) -> None:
    with s3_api(tmp_path, data_root, s3_url, s3_bucket) as api:
        t = api.tenant()
        api.tiny_backbone()
        r = upload(api, t, folder_zip(12))
        assert r.status_code == 201, r.text
        f = r.json()
        keys = _keys(s3_bucket, s3_url)
        assert len(keys) == 1 and keys[0].startswith("uploads/") and keys[0].endswith(f"/{f['id']}.zip")
        assert not api.settings.files_root.exists()  # nothing in a local files folder
        job = api.client.post("/v1/jobs", json=api.job_body(dataset_uri=f["id"]), headers=t).json()
        job = api.wait(job["id"], t)
        assert job["status"] == "succeeded", job
        ev = api.client.post(
            "/v1/evaluations", json={"prompt": job["prompt_id"], "dataset_uri": f["id"]}, headers=t
        ).json()
        ev = wait_evaluation(api, ev["id"], t)
        assert ev["status"] == "succeeded", ev
        assert api.client.delete(f"/v1/files/{f['id']}", headers=t).status_code == 204
        assert _keys(s3_bucket, s3_url) == []


def test_s3_dataset_uris_only_inside_the_allowed_prefixes(
    s3_url: str, tmp_path: Path, data_root: Path
) -> None:
    store, datasets, foreign = new_bucket(s3_url), new_bucket(s3_url), new_bucket(s3_url)
    raw = s3_client(s3_url)
    archive = folder_zip(12)
    for bucket, key in ((datasets, "public/colours.zip"), (foreign, "public/colours.zip")):
        raw.put_object(Bucket=bucket, Key=key, Body=archive)
    with s3_api(tmp_path, data_root, s3_url, store, dataset_s3_prefixes=f"s3://{datasets}/public") as api:
        t = api.tenant()
        api.tiny_backbone()
        for uri in (
            f"s3://{foreign}/public/colours.zip",  # another bucket
            f"s3://{datasets}/private/colours.zip",  # the bucket, outside the prefix
            f"s3://{datasets}/publicity/colours.zip",  # a name that merely starts like the prefix
            f"s3://{store}/uploads/x/file_1.zip",  # the uploads of every tenant
            f"s3://{datasets}/public/../private/colours.zip",  # a key a proxy might resolve out of the prefix
        ):
            r = api.client.post("/v1/jobs", json=api.job_body(dataset_uri=uri), headers=t)
            assert r.status_code == 403, (uri, r.text)
            assert r.json()["error"]["code"] == "dataset_uri_not_allowed"
            assert r.json()["error"]["param"] == "dataset_uri"
        uri = f"s3://{datasets}/public/colours.zip"
        r = api.client.post("/v1/jobs", json=api.job_body(dataset_uri=uri), headers=t)
        assert r.status_code == 202, r.text
        job = api.wait(r.json()["id"], t)
        assert job["status"] == "succeeded", job
        assert job["validation_report"]["num_classes"] == 3
        for dataset in (f"s3://{foreign}/public/colours.zip", uri):
            r = api.client.post(
                "/v1/evaluations", json={"prompt": job["prompt_id"], "dataset_uri": dataset}, headers=t
            )
            assert r.status_code == (403 if dataset != uri else 202), r.text
        assert wait_evaluation(api, r.json()["id"], t)["status"] == "succeeded"
        r = api.client.post(
            "/v1/jobs", json=api.job_body(dataset_uri=f"s3://{datasets}/public/missing.zip"), headers=t
        )
        job = api.wait(r.json()["id"], t)
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_dataset_uri", job


def test_store_down_mid_upload_is_a_503_and_nothing_is_half_stored(
    private_s3: PrivateS3, tmp_path: Path, data_root: Path
) -> None:
    raw = private_s3.client()
    raw.create_bucket(Bucket="uploads-outage")
    settings = settings_for(
        f"sqlite:///{tmp_path / 'actprompt.db'}",
        data_root,
        tmp_path,
        storage_url="s3://uploads-outage/uploads",
        s3_endpoint_url=private_s3.url,
        s3_region="us-east-1",
        storage_part_bytes=5 * MIB,
        s3_timeout_seconds=1.0,
        s3_max_attempts=2,
        max_upload_bytes=64 * MIB,
    )
    boundary = "outage-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    stopped = threading.Event()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(6):
            yield b"\0" * MIB
        # the first part is in the store: now it stops answering, with the upload half done
        deadline = time.monotonic() + 30
        while not any(u for u in raw.list_multipart_uploads(Bucket="uploads-outage").get("Uploads", [])):
            assert time.monotonic() < deadline, "no multipart upload started"
            time.sleep(0.1)
        private_s3.stop()
        stopped.set()
        for _ in range(5):
            yield b"\0" * MIB
        yield f"\r\n--{boundary}--\r\n".encode()

    with serve_in_thread(create_app(settings)) as port, httpx.Client(timeout=60) as http:
        base = f"http://127.0.0.1:{port}"
        admin = {"Authorization": "Bearer test-admin-key"}
        key = http.post(f"{base}/v1/tenants", json={"name": "outage"}, headers=admin).json()["api_key"]
        t = {"Authorization": f"Bearer {key}"}
        try:
            started = time.monotonic()
            r = http.post(
                f"{base}/v1/files",
                content=body(),
                headers={**t, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            elapsed = time.monotonic() - started
        finally:
            private_s3.resume()
        assert stopped.is_set()
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "storage_unavailable" and r.headers["Retry-After"] == "1"
        assert elapsed < 20  # fails within the configured timeouts, not after minutes
        assert http.get(f"{base}/v1/files", headers=t).json()["data"] == []  # no row
        deadline = time.monotonic() + 30
        while raw.list_multipart_uploads(Bucket="uploads-outage").get("Uploads"):
            assert time.monotonic() < deadline, "the half-done upload was never aborted"
            time.sleep(0.2)
        assert raw.list_objects_v2(Bucket="uploads-outage").get("Contents", []) == []
        cached = settings.object_cache_dir
        assert not cached.exists() or [p for p in cached.iterdir() if p.name != ".lock"] == []
        # the store is back: the same upload succeeds
        r = http.post(f"{base}/v1/files", files={"file": ("ok.zip", folder_zip(3))}, headers=t)
        assert r.status_code == 201, r.text
