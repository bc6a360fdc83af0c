"""The front door in production mode: `actprompt serve` against PostgreSQL + Redis, a real `actprompt worker`,
files on a path shared by both (not either's var dir), driven by the light client."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from actprompt import Client

from tests.api.serve import run_server
from tests.api.test_e2e_client import gtsrb_zip
from tests.workers.conftest import Deployment

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def test_upload_train_on_worker_watch_predict_evaluate(
    deployment: Deployment, resnet20_backbone: str, session_factory: Any, tmp_path: Path
) -> None:
    from service.domain.tenants import create_tenant

    with session_factory() as session:
        _tenant, issued = create_tenant(session, "front-door-production")
        session.commit()
    shared = tmp_path / "shared-files"  # the docker-compose volume
    deployment.extra_env["ACTPROMPT_FILES_DIR"] = str(shared)
    deployment.start_worker()
    api_env = {
        **deployment.env(),
        "ACTPROMPT_VAR_DIR": str(tmp_path / "api-var"),
        "ACTPROMPT_ADMIN_KEY": "adm",
    }
    api_env = {k: v for k, v in api_env.items() if k.startswith("ACTPROMPT_")}
    archive = gtsrb_zip(tmp_path / "gtsrb5.zip", train_per_class=40, test_per_class=10)
    with (
        run_server(tmp_path / "api", **api_env) as (url, _admin, _data),
        Client(base_url=url, api_key=issued.secret) as c,
    ):
        f = c.files.upload(archive)
        assert [p.name for p in shared.rglob("file_*")] == [f"{f.id}.zip"]
        job = c.jobs.create(
            backbone=resnet20_backbone,
            dataset=f.id,
            hyperparameters={"epochs": 3, "batch_size": 32, "learning_rate": 0.02},
        )
        events = list(c.jobs.watch(job.id))
        assert events[-1].data == {"status": "succeeded"}, deployment.diagnostics()
        assert [e.data["epoch"] for e in events if e.type == "epoch"] == [1, 2, 3]  # type: ignore[index]
        job = c.jobs.get(job.id)
        assert job.worker_id and job.worker_id.startswith("w0."), job  # trained by the worker, not the API
        assert job.prompt is not None
        with zipfile.ZipFile(archive) as zf:
            first = zf.read(sorted(n for n in zf.namelist() if n.startswith("test/"))[0])
        (tmp_path / "one.png").write_bytes(first)
        by_file, by_bytes = c.predict(prompt=job.prompt, images=[tmp_path / "one.png", first], top_k=3)
        assert [p.label for p in by_file] == [p.label for p in by_bytes] and len(by_file) == 3
        ev = c.evaluations.wait(c.evaluations.create(prompt=job.prompt, dataset=f.id).id, poll=0.5)
        assert ev.status == "succeeded", ev
        assert ev.metrics is not None and ev.metrics["num_images"] == 50
        assert np.array(ev.metrics["confusion_matrix"]).sum() == 50 and ev.metrics["top1"] > 0.4
        artifact = c.prompts.download(job.prompt, tmp_path / "p.safetensors")
        assert artifact.stat().st_size == c.prompts.get(job.prompt).size_bytes
