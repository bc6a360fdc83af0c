"""End to end through the front door: `actprompt serve` as a subprocess, driven by the remote CLI and the
light client (upload a GTSRB subset as a zip, train ResNet-20, watch, predict by file/bytes/PIL, evaluate,
download); the documented errors for bad input; and the client installed alone in a fresh venv (no torch)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from actprompt import Client, ConflictError, NotFoundError, PayloadTooLargeError, UnprocessableEntityError
from PIL import Image

from tests.api.conftest import png_bytes
from tests.api.serve import run_server
from tests.conftest import DATA_DIR, WEIGHTS_DIR

GTSRB = DATA_DIR / "gtsrb32.npz"
RESNET20 = WEIGHTS_DIR / "resnet20-12fca82f.th"
CLI = str(Path(sys.executable).parent / "actprompt")


def gtsrb_zip(path: Path, num_classes: int = 5, train_per_class: int = 60, test_per_class: int = 20) -> Path:
    """The `num_classes` largest GTSRB classes as PNG class folders (`train/<class>/`, `test/<class>/`)."""
    data = np.load(GTSRB)
    counts = np.bincount(data["y_train"], minlength=len(data["classes"]))
    chosen = np.argsort(-counts, kind="stable")[:num_classes]
    with zipfile.ZipFile(path, "w") as zf:
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            x, y = data[f"x_{split}"], data[f"y_{split}"]
            for c in chosen:
                name = str(data["classes"][c]).replace("/", "-")
                for i, idx in enumerate(np.flatnonzero(y == c)[:per_class]):
                    zf.writestr(f"{split}/{name}/{i}.png", png_bytes(x[idx]))
    return path


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def front_door(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    """A server with a tenant and ResNet-20 registered; (url, CLI environment, tmp dir)."""
    with run_server(tmp_path, ACTPROMPT_MAX_FILE_BYTES=str(3 << 20)) as (url, admin_key, _):
        admin = Client(base_url=url, api_key=admin_key)
        r = admin._http.post("/v1/tenants", json={"name": "front-door"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        r = admin._http.post(
            "/v1/backbones", json={"id": "resnet20", "model": "resnet20_cifar", "weights": RESNET20.as_uri()}
        )
        assert r.status_code == 201, r.text
        admin.close()
        env = {**os.environ, "ACTPROMPT_BASE_URL": url, "ACTPROMPT_API_KEY": key}
        yield url, env, tmp_path


@pytest.mark.slow
def test_cli_and_client_flow_on_gtsrb(front_door: tuple[str, dict[str, str], Path]) -> None:
    url, env, tmp = front_door
    archive = gtsrb_zip(tmp / "gtsrb5.zip")

    # CLI: upload, train (watch: progress bar + one line per epoch), predict, evaluate, download
    f = json.loads(cli("files", "upload", str(archive), "--json", env=env).stdout)
    assert f["id"].startswith("file_") and f["bytes"] == archive.stat().st_size
    job = json.loads(
        cli(
            "jobs", "create", "--backbone", "resnet20", "--dataset", f["id"], "--epochs", "3",
            "--hp", "batch_size=32", "--hp", "learning_rate=0.02", "--json", env=env,
        ).stdout
    )  # fmt: skip
    watched = cli("jobs", "watch", job["id"], env=env)
    lines = watched.stdout.splitlines()
    epochs = [line.split(":")[0] for line in lines if line.startswith("epoch ")]
    assert epochs == ["epoch 1", "epoch 2", "epoch 3"], watched.stdout
    assert "100%|" in watched.stderr  # the progress bar, full at the end
    assert lines[-1].startswith(f"{job['id']}  succeeded  prompt prm_"), watched.stdout
    ref = lines[-1].split("prompt ")[1].split()[0]

    with zipfile.ZipFile(archive) as zf:
        test_names = sorted(n for n in zf.namelist() if n.startswith("test/"))[:6]
        for n in test_names:
            (tmp / n.replace("/", "_")).write_bytes(zf.read(n))
    images = [tmp / n.replace("/", "_") for n in test_names]
    remote = json.loads(
        cli("predict", "--prompt", ref, *map(str, images), "--top-k", "2", "--json", env=env).stdout
    )
    assert [len(r["predictions"]) for r in remote] == [2] * len(images)

    ev = json.loads(
        cli(
            "evaluations", "create", "--prompt", ref, "--dataset", f["id"], "--wait", "--json", env=env
        ).stdout
    )
    assert ev["status"] == "succeeded", ev
    m = ev["metrics"]
    assert m["num_images"] == 5 * 20 and len(m["classes"]) == 5
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 100 and cm.sum(axis=1).tolist() == [20] * 5
    assert m["top1"] == pytest.approx(np.trace(cm) / 100) and m["top5"] == 1.0
    assert m["top1"] > 0.5, m  # five classes: chance is 0.2
    print(f"front door: GTSRB 5-class evaluation top-1 {m['top1']:.3f} over 100 test images")

    artifact = tmp / "prompt.safetensors"
    cli("prompts", "download", ref, str(artifact), env=env)
    local = json.loads(
        cli(
            "predict",
            str(artifact),
            *map(str, images),
            "--top-k",
            "2",
            "--json",
            env={**env, "ACTPROMPT_BASE_URL": ""},
        ).stdout
    )
    assert [r["predictions"][0]["label"] for r in local] == [r["predictions"][0]["label"] for r in remote]

    # the client: predict by path, bytes and PIL image agree with the CLI; pages; watch replays; errors
    with Client(base_url=url, api_key=env["ACTPROMPT_API_KEY"]) as c:
        first = images[0]
        rows = c.predict(prompt=ref, images=[first, first.read_bytes(), Image.open(first)], top_k=2)
        assert len({tuple((p.label, round(p.probability, 4)) for p in row) for row in rows}) == 1
        assert rows[0][0].label == remote[0]["predictions"][0]["label"]
        assert [j.id for j in c.jobs.list(status="succeeded", page_size=1)] == [job["id"]]
        events = list(c.jobs.watch(job["id"]))
        assert events[-1].type == "end" and events[-1].data == {"status": "succeeded"}
        ids = [e.id for e in events[:-1]]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        resumed = list(c.jobs.watch(job["id"], after=ids[len(ids) // 2]))
        assert [e.id for e in resumed[:-1]] == ids[len(ids) // 2 + 1 :]
        with pytest.raises(NotFoundError) as nf:
            c.jobs.get("job_missing")
        assert (nf.value.status, nf.value.code, nf.value.param) == (404, "job_not_found", "job_id")

        # bad input: an oversized upload, a zip that is not a dataset, deleting a file in use
        big = tmp / "big.zip"
        big.write_bytes(os.urandom(4 << 20))
        with pytest.raises(PayloadTooLargeError) as too_big:
            c.files.upload(big)
        assert too_big.value.status == 413 and too_big.value.code == "payload_too_large"
        not_zip = tmp / "fake.zip"
        not_zip.write_bytes(b"just text")
        with pytest.raises(UnprocessableEntityError) as bad:
            c.files.upload(not_zip)
        assert (bad.value.code, bad.value.param) == ("invalid_file", "file")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("README.txt", "no images here")
        junk = c.files.upload(io.BytesIO(buf.getvalue()), filename="junk.zip")
        failed = c.jobs.wait(c.jobs.create(backbone="resnet20", dataset=junk.id).id)
        assert failed.status == "failed" and failed.error is not None, failed
        assert failed.error["param"] == "dataset_uri" or "dataset" in failed.error["message"], failed.error

        busy = c.jobs.create(backbone="resnet20", dataset=f["id"], hyperparameters={"epochs": 50})
        with pytest.raises(ConflictError) as in_use:
            c.files.delete(f["id"])
        assert in_use.value.code == "file_in_use" and busy.id in in_use.value.message
        assert c.jobs.cancel(busy.id).status in ("cancelled", "cancelling")
        c.jobs.wait(busy.id)
        c.files.delete(f["id"])
        with pytest.raises(NotFoundError):
            c.files.get(f["id"])

    _client_alone_in_fresh_venv(tmp, url, env["ACTPROMPT_API_KEY"], ref, first, rows[0][0].label)


def _client_alone_in_fresh_venv(tmp: Path, url: str, key: str, ref: str, image: Path, label: str) -> None:
    """`pip install ./client` into a new venv: no torch comes with it, and it predicts like the rest."""
    venv = tmp / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    client_dir = Path(__file__).resolve().parents[2] / "client"
    # the wheel is built here (setuptools of this venv: no build dependency to fetch), then installed
    # alone; pip finds httpx and pydantic through the machine's configured index or cache
    wheels = tmp / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(client_dir)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("actprompt_client-*.whl")
    pip = subprocess.run(
        [py, "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert pip.returncode == 0, pip.stderr
    script = (
        "import importlib.util, sys, actprompt\n"
        "assert importlib.util.find_spec('torch') is None and importlib.util.find_spec('fastapi') is None\n"
        f"c = actprompt.Client(base_url={url!r}, api_key={key!r})\n"
        f"print(c.predict(prompt={ref!r}, images=[{str(image)!r}], top_k=1)[0][0].label)\n"
        "try:\n    c.prompts.get('prm_missing')\nexcept actprompt.NotFoundError as e:\n    print(e.code)\n"
    )
    out = subprocess.run([py, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [label, "prompt_not_found"]
