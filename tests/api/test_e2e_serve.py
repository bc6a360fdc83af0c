"""End to end: `actprompt serve` as a subprocess, real ResNet-20, a GTSRB subset, predict over HTTP."""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.api.conftest import png_bytes
from tests.api.serve import run_server
from tests.conftest import DATA_DIR, WEIGHTS_DIR

GTSRB = DATA_DIR / "gtsrb32.npz"
RESNET20 = WEIGHTS_DIR / "resnet20-12fca82f.th"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    with run_server(tmp_path) as running:
        yield running


@pytest.mark.slow
def test_serve_train_resnet20_on_gtsrb_and_predict(server: tuple[str, str, Path]) -> None:
    url, admin_key, data_root = server
    assert GTSRB.is_file() and RESNET20.is_file()
    data = np.load(GTSRB)
    rng = np.random.default_rng(0)
    train_idx = rng.permutation(len(data["y_train"]))[:1500]
    test_idx = rng.permutation(len(data["y_test"]))[:256]
    np.savez(
        data_root / "gtsrb_subset.npz",
        x_train=data["x_train"][train_idx],
        y_train=data["y_train"][train_idx],
        classes=data["classes"],
    )
    admin = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/tenants", json={"name": "e2e"}, headers=admin)
        assert r.status_code == 201, r.text
        t = {"Authorization": f"Bearer {r.json()['api_key']}"}
        r = c.post(
            "/v1/backbones",
            json={"id": "resnet20", "model": "resnet20_cifar", "weights": RESNET20.as_uri()},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        r = c.post(
            "/v1/jobs",
            json={
                "backbone": "resnet20",
                "dataset_uri": (data_root / "gtsrb_subset.npz").as_uri(),
                "hyperparameters": {"epochs": 4, "batch_size": 64, "learning_rate": 0.02},
            },
            headers={**t, "Idempotency-Key": "e2e-1"},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            job = c.get(f"/v1/jobs/{job_id}", headers=t).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        assert job["status"] == "succeeded", job
        x_test, y_test = data["x_test"][test_idx], data["y_test"][test_idx]
        correct = 0
        for start in range(0, len(y_test), 64):
            images = [base64.b64encode(png_bytes(img)).decode() for img in x_test[start : start + 64]]
            r = c.post("/v1/predict", json={"prompt": job["prompt"], "images": images, "top_k": 1}, headers=t)
            assert r.status_code == 200, r.text
            predicted = np.array([p[0]["index"] for p in r.json()["predictions"]])
            correct += int((predicted == y_test[start : start + 64]).sum())
        accuracy = correct / len(y_test)
        print(
            f"e2e: GTSRB subset accuracy {accuracy:.3f} over {len(y_test)} test images; job {job['metrics']}"
        )
        assert accuracy > 0.25  # chance is 1/43 = 2.3%


def _printed_walkthrough(printed: str) -> str:
    """The shell commands of the walkthrough `actprompt serve` printed, exactly as a user would copy them."""
    block = printed.split("Walkthrough", 1)[1].split("\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.startswith("{"):  # the server's own JSON log lines follow the walkthrough
            break
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def test_printed_walkthrough_runs_as_is(server: tuple[str, str, Path], tmp_path: Path) -> None:
    """Paste the printed walkthrough into bash: every step works, the last one predicts."""
    printed = (tmp_path / "serve.log").read_text()
    script = _printed_walkthrough(printed)
    assert "/abs/path" not in script and "some_image" not in script
    work = tmp_path / "user"
    work.mkdir()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    import json

    answer = json.loads(last)
    assert answer["object"] == "predictions" and len(answer["predictions"]) == 1, last
    assert answer["predictions"][0][0]["label"] in ("red", "green", "blue")
    assert "event: end" in result.stdout and '"status": "succeeded"' in result.stdout
