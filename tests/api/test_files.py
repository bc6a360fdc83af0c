"""Files API and evaluations in-process (SQLite and PostgreSQL): upload, use as dataset, refusals, scoring."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from datetime import timedelta

import numpy as np
import pytest

from service.db.base import utcnow
from service.db.models import Evaluation
from service.db.session import make_engine, make_session_factory
from tests.api.conftest import Api, make_images, png_bytes


def folder_zip(
    n_per_class: int = 10, seed: int = 0, classes: tuple[str, ...] = ("red", "green", "blue")
) -> bytes:
    """A zip of class folders (`train/<class>/<i>.png`), the format users upload most."""
    x, y = make_images(n_per_class, num_classes=len(classes), seed=seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            zf.writestr(f"train/{classes[int(label)]}/{i}.png", png_bytes(img))
    return buf.getvalue()


def upload(api: Api, headers: dict[str, str], data: bytes, name: str = "data.zip"):
    return api.client.post("/v1/files", files={"file": (name, data, "application/zip")}, headers=headers)


def test_upload_get_list_delete(api: Api) -> None:
    t = api.tenant()
    data = folder_zip()
    r = upload(api, t, data)
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["id"].startswith("file_") and f["bytes"] == len(data) and f["filename"] == "data.zip"
    assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["status"] == "uploaded"
    stored = list((api.settings.files_root).rglob("file_*"))
    assert [p.read_bytes() for p in stored] == [data]
    assert api.client.get(f"/v1/files/{f['id']}", headers=t).json() == f
    second = upload(api, t, data, "again.zip").json()
    page = api.client.get("/v1/files?limit=1", headers=t).json()
    assert [x["id"] for x in page["data"]] == [second["id"]] and page["has_more"]
    rest = api.client.get(f"/v1/files?limit=1&after={page['next_cursor']}", headers=t).json()
    assert [x["id"] for x in rest["data"]] == [f["id"]] and not rest["has_more"]
    other = api.tenant("other")
    assert api.client.get(f"/v1/files/{f['id']}", headers=other).status_code == 404
    assert api.client.delete(f"/v1/files/{f['id']}", headers=other).status_code == 404
    assert api.client.delete(f"/v1/files/{f['id']}", headers=t).status_code == 204
    assert api.client.get(f"/v1/files/{f['id']}", headers=t).json()["error"]["code"] == "file_not_found"
    assert len(list(api.settings.files_root.rglob("file_*"))) == 1  # the bytes went with the row


def test_upload_refusals(make_api) -> None:
    api = make_api(max_file_bytes=4096)
    t = api.tenant()
    r = upload(api, t, b"x" * 10_000)
    assert r.status_code == 413 and r.json()["error"]["code"] in ("file_too_large", "payload_too_large")
    r = upload(api, t, b"PK\x03\x04 not really a zip")
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "invalid_file",
        "message": "file 'data.zip' is not a valid .zip archive",
        "param": "file",
    }
    r = upload(api, t, b"hello", name="notes.txt")
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_file_type"
    r = api.client.post("/v1/files", json={"file": "x"}, headers=t)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_media_type"
    r = api.client.post("/v1/files", files={"other": ("a.zip", b"x")}, headers=t)
    assert r.status_code == 422 and r.json()["error"]["param"] == "file"
    assert api.client.post("/v1/files", files={"file": ("a.zip", b"x")}).status_code == 401
    assert [p for p in api.settings.files_root.rglob("*") if p.is_file()] == []  # no partial upload left


def test_file_as_job_dataset_and_in_use(make_api) -> None:
    api = make_api(embedded_worker=False)  # jobs stay queued: the file is in use
    t = api.tenant()
    api.tiny_backbone()
    f = upload(api, t, folder_zip()).json()
    r = api.client.post("/v1/jobs", json=api.job_body(dataset_uri=f["id"]), headers=t)
    assert r.status_code == 202, r.text
    r = api.client.delete(f"/v1/files/{f['id']}", headers=t)
    assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use"
    assert r.json()["error"]["message"].startswith(f"file {f['id']} is used by job_")
    other = api.tenant("other")
    r = api.client.post("/v1/jobs", json=api.job_body(dataset_uri=f["id"]), headers=other)
    assert r.status_code == 404 and r.json()["error"] == {
        "code": "file_not_found",
        "message": f"no file {f['id']!r}",
        "param": "dataset_uri",
    }
    job_id = api.client.get("/v1/jobs", headers=t).json()["data"][0]["id"]
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=t).json()["status"] == "cancelled"
    assert api.client.delete(f"/v1/files/{f['id']}", headers=t).status_code == 204


@pytest.mark.slow
def test_train_on_upload_then_evaluate(api: Api) -> None:
    t = api.tenant()
    api.tiny_backbone()
    f = upload(api, t, folder_zip(12)).json()
    job = api.client.post("/v1/jobs", json=api.job_body(dataset_uri=f["id"]), headers=t).json()
    job = api.wait(job["id"], t)
    assert job["status"] == "succeeded", job
    assert job["validation_report"]["num_classes"] == 3
    held_out = upload(api, t, folder_zip(5, seed=7), "held_out.zip").json()
    r = api.client.post(
        "/v1/evaluations", json={"prompt": job["prompt_id"], "dataset_uri": held_out["id"]}, headers=t
    )
    assert r.status_code == 202, r.text
    ev = r.json()
    assert ev["prompt"] == job["prompt"] and ev["status"] in ("queued", "running", "succeeded")
    for _ in range(600):
        ev = api.client.get(f"/v1/evaluations/{ev['id']}", headers=t).json()
        if ev["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert ev["status"] == "succeeded", ev
    m = ev["metrics"]
    assert m["num_images"] == 15 and m["classes"] == ["blue", "green", "red"]
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 15 and cm.sum(axis=1).tolist() == [5, 5, 5]
    assert m["top1"] == pytest.approx(np.trace(cm) / 15)
    assert m["top5"] == 1.0  # three classes: the true one is always in the top 5
    assert {k: v["support"] for k, v in m["per_class"].items()} == {"blue": 5, "green": 5, "red": 5}
    assert m["top1"] > 0.6  # learnable synthetic classes; chance is 1/3
    # the evaluation agrees with /v1/predict image by image: the confusion matrix is rebuilt from predictions
    x, y = make_images(5, num_classes=3, seed=7)
    names = ["red", "green", "blue"]  # folder_zip's label order; the prompt's classes are sorted by name
    files = [("images", (f"{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(x)]
    r = api.client.post("/v1/predict", data={"prompt": ev["prompt"], "top_k": "1"}, files=files, headers=t)
    assert r.status_code == 200, r.text
    expected = np.zeros((3, 3), dtype=int)
    for label, row in zip(y, r.json()["predictions"], strict=True):
        expected[m["classes"].index(names[int(label)]), row[0]["index"]] += 1
    assert cm.tolist() == expected.tolist()
    listed = api.client.get("/v1/evaluations", headers=t).json()
    assert [e["id"] for e in listed["data"]] == [ev["id"]]


def test_evaluation_refusals(api: Api) -> None:
    t = api.tenant()
    r = api.client.post("/v1/evaluations", json={"prompt": "prm_nope", "dataset_uri": "file_nope"}, headers=t)
    assert r.status_code == 404 and r.json()["error"]["code"] == "prompt_not_found"
    r = api.client.post("/v1/evaluations", json={"prompt": "prm_x"}, headers=t)
    assert r.status_code == 422 and r.json()["error"]["param"] == "dataset_uri"
    assert api.client.get("/v1/evaluations/eval_nope", headers=t).status_code == 404


def test_orphaned_evaluation_fails_at_startup(make_api, database_url: str) -> None:
    api = make_api()
    t = api.tenant()
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    with factory() as session:
        from service.db.models import Tenant

        tenant_id = session.query(Tenant).first().id  # type: ignore[union-attr]
        stale = utcnow() - timedelta(seconds=api.settings.lease_seconds * 2)
        session.add(
            Evaluation(
                id="eval_orphan",
                tenant_id=tenant_id,
                status="running",
                prompt_id="prm_x",
                prompt_version=1,
                dataset_uri="file_x",
                heartbeat_at=stale,
                created_at=stale,
                updated_at=stale,
            )
        )
        session.commit()
    api.client.__exit__(None, None, None)
    again = make_api()  # a restart: the sweep at start-up
    ev = again.client.get("/v1/evaluations/eval_orphan", headers=t).json()
    assert ev["status"] == "failed" and ev["error"]["code"] == "evaluation_interrupted", ev
    engine.dispose()


def test_score_rows_are_true_classes_and_top5_counts_any_rank() -> None:
    from service.domain.evaluations import score

    # true labels and each image's ranked guesses (indices into the three classes)
    m = score([0, 0, 1, 2], [[1, 0, 2], [0, 1, 2], [1, 2, 0], [0, 2, 1]], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]  # row = truth, column = top-1 guess
    assert (m["top1"], m["top5"]) == (0.5, 1.0)
    assert m["per_class"] == {
        "a": {"support": 2, "accuracy": 0.5},
        "b": {"support": 1, "accuracy": 1.0},
        "c": {"support": 1, "accuracy": 0.0},
    }
