"""`method: "auto"` through the API: the candidates' table on the job, the chosen method on the prompt,
and method options checked at submission."""

from __future__ import annotations

import base64

import pytest

from tests.api.conftest import Api, make_images, png_bytes

ROW_KEYS = {"method", "val_accuracy", "trainable_params", "train_seconds", "serving_ms_per_image", "chosen"}


def test_auto_job_records_the_candidates_and_stores_the_chosen_method(api: Api) -> None:
    api.tiny_backbone()
    t = api.tenant()
    c = api.client
    body = api.job_body(method="auto", method_options={"prefer": "accuracy"})
    r = c.post("/v1/jobs", json=body, headers=t)
    assert r.status_code == 202, r.text
    assert r.json()["method"] == "auto" and r.json()["method_options"] == {"prefer": "accuracy"}
    assert "method_options" not in r.json()["hyperparameters"]
    job = api.wait(r.json()["id"], t)
    assert job["status"] == "succeeded", job
    search = job["metrics"]["auto"]
    table = search["candidates"]
    assert len(table) >= 2 and [row["chosen"] for row in table].count(True) == 1
    for row in table:
        assert set(row) >= ROW_KEYS, ROW_KEYS - set(row)
    chosen = next(row for row in table if row["chosen"])
    assert chosen["val_accuracy"] == max(row["val_accuracy"] for row in table)  # ties: the cheaper serving
    assert search["chosen"] == chosen["method"]
    prompt = c.get(f"/v1/prompts/{job['prompt_id']}", headers=t).json()
    assert prompt["method"] == chosen["method"]
    events = c.get(f"/v1/jobs/{job['id']}/events", params={"limit": 200}, headers=t).json()["data"]
    rows = [e["data"] for e in events if e["type"] == "method_search"]
    assert [row["method"] for row in rows] == [row["method"] for row in table]
    x, _ = make_images(1, seed=7)
    images = [base64.b64encode(png_bytes(img)).decode() for img in x]
    pred = c.post("/v1/predict", json={"prompt": job["prompt"], "images": images}, headers=t)
    assert pred.status_code == 200 and len(pred.json()["predictions"]) == len(images), pred.text


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"method": "auto", "prompt_layer": 1}, "prompt_layer"),
        ({"method": "auto", "method_options": {"lora_rank": 4}}, "lora_rank"),
        ({"method": "auto", "method_options": {"prefer": "speed"}}, "prefer"),
        ({"method": "auto", "method_options": {"max_train_seconds": -1}}, "max_train_seconds"),
        ({"method": "activation", "method_options": {"prompt_layers": [1]}}, "prompt_layers"),
        ({"method": "activation", "method_options": {"bogus": 1}}, "bogus"),
        ({"method": "linear", "method_options": {"lora_rank": 8}}, "lora_rank"),
    ],
)
def test_method_options_are_checked_at_submission(api: Api, overrides: dict, param: str) -> None:
    api.tiny_backbone()
    t = api.tenant()
    r = api.client.post("/v1/jobs", json=api.job_body(**overrides), headers=t)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param, r.text
