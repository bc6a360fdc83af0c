"""Uploads in S3 in production mode: `actprompt serve` and a real `actprompt worker` that share no folder
(each its own var dir and object cache), over PostgreSQL, Redis and moto's standalone S3 server.

* upload through the API, train on the worker (which downloads into its own cache), predict;
* the object store stops answering while a job waits: the worker waits with it and the job succeeds, in
  its first attempt, once the store answers again.
"""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from actprompt import Client

from tests.api.serve import run_server
from tests.api.test_e2e_client import gtsrb_zip
from tests.conftest import PrivateS3
from tests.workers.conftest import TERMINAL, Deployment, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

HYPER = {"epochs": 2, "batch_size": 32, "learning_rate": 0.02, "seed": 0, "val_fraction": 0.1}


def s3_env(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    return {
        "ACTPROMPT_STORAGE_URL": f"s3://{bucket}/uploads",
        "ACTPROMPT_S3_ENDPOINT_URL": endpoint,
        "ACTPROMPT_S3_REGION": "us-east-1",
        **extra,
    }


def _cached(var_dir: Path) -> list[str]:
    folder = var_dir / "cache" / "objects"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_upload_through_the_api_train_on_a_worker_with_its_own_cache_then_predict(
    deployment: Deployment,
    resnet20_backbone: str,
    session_factory: Any,
    s3_url: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    from service.domain.tenants import create_tenant

    with session_factory() as session:
        _tenant, issued = create_tenant(session, "s3-production")
        session.commit()
    deployment.extra_env.update(s3_env(s3_url, s3_bucket))
    deployment.start_worker()
    worker_var, api_var = tmp_path / "var", tmp_path / "api-var"
    api_env = {**deployment.env(), "ACTPROMPT_VAR_DIR": str(api_var), "ACTPROMPT_ADMIN_KEY": "adm"}
    api_env = {k: v for k, v in api_env.items() if k.startswith(("ACTPROMPT_", "AWS_"))}
    archive = gtsrb_zip(tmp_path / "gtsrb5.zip", train_per_class=40, test_per_class=10)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    with (
        run_server(tmp_path / "api", **api_env) as (url, _admin, _data),
        Client(base_url=url, api_key=issued.secret) as c,
    ):
        f = c.files.upload(archive)
        assert f.sha256 == sha
        assert _cached(api_var) == [f"{sha}.zip"] and _cached(worker_var) == []
        job = c.jobs.create(backbone=resnet20_backbone, dataset=f.id, hyperparameters=HYPER)
        deployment.wait_status(job.id, TERMINAL, 300)
        job = c.jobs.get(job.id)
        assert job.status == "succeeded", (job, deployment.diagnostics())
        assert job.worker_id and job.worker_id.startswith("w0."), job  # trained by the worker
        assert _cached(worker_var) == [f"{sha}.zip"]  # fetched from S3 into the worker's own cache
        assert not list(tmp_path.rglob("files"))  # no local files folder anywhere
        assert job.prompt is not None
        with zipfile.ZipFile(archive) as zf:
            first = zf.read(sorted(n for n in zf.namelist() if n.startswith("test/"))[0])
        (predictions,) = c.predict(prompt=job.prompt, images=[first], top_k=3)
        assert len(predictions) == 3


def test_store_down_while_a_job_waits_the_worker_waits_and_the_job_succeeds_when_it_returns(
    deployment: Deployment,
    tenant_id: str,
    resnet20_backbone: str,
    session_factory: Any,
    private_s3: PrivateS3,
    tmp_path: Path,
) -> None:
    from service.domain import files
    from service.domain.jobs import JobRequest, create_job
    from service.storage import create_storage

    private_s3.client().create_bucket(Bucket="uploads-queued")
    deployment.extra_env.update(
        s3_env(
            private_s3.url,
            "uploads-queued",
            ACTPROMPT_S3_TIMEOUT_SECONDS="1",
            ACTPROMPT_S3_MAX_ATTEMPTS="1",
            ACTPROMPT_STORAGE_WAIT_SECONDS="300",
        )
    )
    # the upload, as the API stores it (into the API's own cache folder)
    api_settings = deployment.settings().model_copy(update={"var_dir": tmp_path / "api-var"})
    archive = gtsrb_zip(tmp_path / "gtsrb3.zip", num_classes=3, train_per_class=30, test_per_class=5)
    file_id, key = files.new_file_key(tenant_id, archive.name)
    writer = create_storage(api_settings).writer(key)
    writer.write(archive.read_bytes())
    writer.commit()
    with session_factory() as session:
        files.record_file(
            session, tenant_id, file_id, archive.name, key, writer.bytes_written, writer.sha256()
        )
        job, _ = create_job(
            session,
            tenant_id,
            JobRequest(backbone=resnet20_backbone, dataset_uri=file_id, hyperparameters=HYPER),
            idempotency_key=None,
            settings=deployment.settings(),
        )
        session.commit()
        job_id = str(job.id)

    private_s3.stop()
    try:
        deployment.start_worker()
        deployment.enqueue(job_id)

        def waiting() -> bool:
            return any("waiting for the object store" in e.message for e in deployment.events(job_id))

        wait_for(waiting, 120, "the worker to wait for the object store", on_timeout=deployment.diagnostics)
        time.sleep(8)  # past a lease (6 s): the waiting worker keeps it, the reaper leaves the job alone
        held = deployment.job(job_id)
        assert held.status == "validating" and held.attempts == 1 and held.error is None, held.error
    finally:
        private_s3.resume()
    job = deployment.wait_status(job_id, TERMINAL, 300)
    assert job.status == "succeeded", (job.error, deployment.diagnostics())
    assert job.attempts == 1 and job.validation_report["num_classes"] == 3
