"""The product end to end on data only a prompt can learn: AP through the API beats the linear probe,
and what `/v1/predict` serves equals the engine's own single-artifact prediction."""

from __future__ import annotations

import base64
from pathlib import Path

import torch

from service.engine import BackboneSpec, create_backbone, decode_image
from service.engine.artifacts import PromptArtifact
from service.engine.mixed_batch import predict_single
from tests.api.conftest import Api, png_bytes
from tests.signal_data import square_images


def _train(api: Api, tenant: dict[str, str], **body: object) -> dict:
    uri = (Path(api.settings.data_roots) / "squares.npz").as_uri()
    hp = {"epochs": 10, "batch_size": 32, "learning_rate": 0.03}
    r = api.client.post(
        "/v1/jobs", json=api.job_body(dataset_uri=uri, hyperparameters=hp, **body), headers=tenant
    )
    assert r.status_code == 202, r.text
    job = api.wait(r.json()["id"], tenant)
    assert job["status"] == "succeeded", job
    return dict(job)


def test_prompt_beats_probe_and_serving_equals_the_engine(api: Api) -> None:
    api.tiny_backbone()
    t = api.tenant()
    ap = _train(api, t, method="activation", prompt_layer=2)
    probe = _train(api, t, method="linear")
    ap_acc, probe_acc = ap["metrics"]["test"]["top1"], probe["metrics"]["test"]["top1"]
    assert ap_acc >= probe_acc + 0.25, f"AP {ap_acc:.3f} vs linear probe {probe_acc:.3f}"

    # served probabilities == the engine's prediction from the downloaded artifact, to 1e-5
    images, _ = square_images(6, seed=5)
    pngs = [png_bytes(img) for img in images]
    body = {"prompt": ap["prompt"], "images": [base64.b64encode(p).decode() for p in pngs], "top_k": 2}
    r = api.client.post("/v1/predict", json=body, headers=t)
    assert r.status_code == 200, r.text
    served = torch.zeros(len(pngs), 2)
    for row, preds in enumerate(r.json()["predictions"]):
        for p in preds:
            served[row, p["index"]] = p["probability"]

    data = api.client.get(f"/v1/prompts/{ap['prompt']}/artifact", headers=t).content
    artifact = PromptArtifact.from_bytes(data)
    bb = create_backbone(BackboneSpec.from_dict(artifact.metadata["backbone"]))
    x = artifact.preprocessing(bb)([decode_image(p) for p in pngs])
    expected = torch.softmax(predict_single(bb, artifact, x).float(), dim=1)
    assert torch.allclose(served, expected, atol=1e-5), (served, expected)
    assert len({tuple(row.tolist()) for row in expected}) > 1  # not one constant answer
