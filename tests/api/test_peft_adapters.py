"""PEFT LoRA adapters in and out, with adapters made by `peft` itself on the timm backbone, outside the
product: import (served predictions equal peft's forward), base-model and layer mismatches (422 naming
them), and export (peft loads it back and computes the same outputs)."""

from __future__ import annotations

import base64
import copy
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import peft
import pytest
import timm
import torch

from service.engine import BackboneSpec, create_backbone, preprocess
from service.engine.backbones import Backbone
from tests.api.conftest import Api, make_images, png_bytes

CLASSES = ["red", "green", "blue"]
#: A few convolutions across the depth (stem, a block, a strided block with its shortcut).
TARGETS = r"conv1|layer1\.0\.conv1|layer2\.0\.conv2|layer3\.1\.conv1"


@pytest.fixture(scope="module")
def r20(resnet20_uri: str) -> Backbone:
    return create_backbone(BackboneSpec("resnet20_cifar", weights=resnet20_uri))


def peft_model(base: torch.nn.Module, classifier: str, targets: str, seed: int = 0) -> peft.PeftModel:
    """peft's LoRA on a copy of the timm model with a 3-class head; the factors and head randomised (a
    fresh adapter is the identity, which would match anything)."""
    model = copy.deepcopy(base)
    model.reset_classifier(len(CLASSES))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=[classifier])
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return pm.eval()


def adapter_zip(pm: peft.PeftModel, folder: Path, edit_config: dict | None = None) -> bytes:
    pm.save_pretrained(folder)
    if edit_config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit_config}))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(folder / name, f"adapter/{name}")
    return buf.getvalue()


def register_r20(api: Api, uri: str) -> None:
    spec = {"id": "r20", "model": "resnet20_cifar", "weights": uri}
    r = api.client.post("/v1/backbones", json=spec, headers=api.admin)
    assert r.status_code in (201, 409), r.text


def served_probabilities(api: Api, t: dict, prompt: str, images: np.ndarray) -> np.ndarray:
    b64 = [base64.b64encode(png_bytes(img)).decode() for img in images]
    r = api.client.post("/v1/predict", json={"prompt": prompt, "images": b64, "top_k": 3}, headers=t)
    assert r.status_code == 200, r.text
    out = np.zeros((len(images), len(CLASSES)))
    for i, preds in enumerate(r.json()["predictions"]):
        for p in preds:
            out[i, p["index"]] = p["probability"]
    return out


def peft_probabilities(pm: torch.nn.Module, backbone: Backbone, images: np.ndarray) -> np.ndarray:
    spec = backbone.spec
    x = preprocess(images, backbone.input_size, spec.mean or (), spec.std or ())
    with torch.no_grad():
        return torch.softmax(pm(x), dim=1).numpy()


def test_import_a_peft_adapter_then_export_it_back(
    api: Api, r20: Backbone, resnet20_uri: str, tmp_path: Path
) -> None:
    register_r20(api, resnet20_uri)
    t = api.tenant()
    pm = peft_model(r20.model, "linear", TARGETS)
    data = adapter_zip(pm, tmp_path / "made-by-peft")
    files = {"artifact": ("adapter.zip", data, "application/zip")}
    form = {"backbone": "r20", "classes": ",".join(CLASSES), "name": "from peft"}
    r = api.client.post("/v1/prompts", data=form, files=files, headers=t)
    assert r.status_code == 201, r.text
    prompt = r.json()
    assert prompt["method"] == "lora" and prompt["classes"] == CLASSES and prompt["imported"]
    images, _ = make_images(2, seed=3)
    served = served_probabilities(api, t, prompt["ref"], images)
    expected = peft_probabilities(pm, r20, images)
    assert np.abs(served - expected).max() < 1e-4, (served, expected)
    assert served.argmax(1).tolist() == expected.argmax(1).tolist()

    # export: PEFT's own loader reads it, and the model it builds computes the served outputs
    r = api.client.get(f"/v1/prompts/{prompt['ref']}/peft", headers=t)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
    out = tmp_path / "exported"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "resnet20_cifar" and config["modules_to_save"] == ["linear"]
    base = copy.deepcopy(r20.model)
    base.reset_classifier(len(CLASSES))
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    again = peft_probabilities(loaded, r20, images)
    assert np.abs(again - expected).max() < 1e-5
    # ... and importing the export gives a prompt that serves the same
    r = api.client.post(
        "/v1/prompts", data={"backbone": "r20", "classes": json.dumps(CLASSES)},
        files={"artifact": ("again.zip", r.content, "application/zip")}, headers=t,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    assert np.abs(served_probabilities(api, t, r.json()["ref"], images) - expected).max() < 1e-4


def test_export_of_a_trained_lora_prompt_loads_in_peft(
    api: Api, r20: Backbone, resnet20_uri: str, tmp_path: Path
) -> None:
    register_r20(api, resnet20_uri)
    t = api.tenant()
    body = api.job_body(backbone="r20", method="lora", hyperparameters={"epochs": 1, "batch_size": 16})
    r = api.client.post("/v1/jobs", json=body, headers=t)
    assert r.status_code == 202, r.text
    job = api.wait(r.json()["id"], t)
    assert job["status"] == "succeeded", job
    r = api.client.get(f"/v1/prompts/{job['prompt']}/peft", headers=t)
    assert r.status_code == 200, r.text
    out = tmp_path / "trained"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    base = copy.deepcopy(r20.model)
    base.reset_classifier(len(CLASSES))
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    images, _ = make_images(2, seed=5)
    served = served_probabilities(api, t, job["prompt"], images)
    assert np.abs(peft_probabilities(loaded, r20, images) - served).max() < 1e-4


def test_a_non_lora_prompt_has_no_peft_form(api: Api) -> None:
    api.tiny_backbone()
    t = api.tenant()
    r = api.client.post("/v1/jobs", json=api.job_body(hyperparameters={"epochs": 1}), headers=t)
    job = api.wait(r.json()["id"], t)
    assert job["status"] == "succeeded", job
    r = api.client.get(f"/v1/prompts/{job['prompt']}/peft", headers=t)
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_a_lora_prompt", r.text


def _import(api: Api, t: dict, data: bytes) -> dict:
    files = {"artifact": ("adapter.zip", data, "application/zip")}
    r = api.client.post("/v1/prompts", data={"backbone": "r20"}, files=files, headers=t)
    assert r.status_code == 422, r.text
    return dict(r.json()["error"])


def test_an_adapter_of_another_base_model_is_refused_naming_it(
    api: Api, r20: Backbone, resnet20_uri: str, tmp_path: Path
) -> None:
    register_r20(api, resnet20_uri)
    t = api.tenant()
    vit = timm.create_model("vit_cifar10_p4_d128_l6")
    error = _import(api, t, adapter_zip(peft_model(vit, "head", r"blocks\.0\.attn\.qkv"), tmp_path / "vit"))
    assert error["code"] == "base_model_mismatch" and error["param"] == "base_model", error
    assert "VisionTransformer" in error["message"] and "resnet20_cifar" in error["message"]
    # the same adapter shape, but recorded as trained on another named model
    named = adapter_zip(
        peft_model(r20.model, "linear", TARGETS),
        tmp_path / "named",
        {"base_model_name_or_path": "resnet56_cifar"},
    )
    error = _import(api, t, named)
    assert error["code"] == "base_model_mismatch" and "resnet56_cifar" in error["message"], error
    assert api.client.get("/v1/prompts", headers=t).json()["data"] == []


def test_an_adapter_of_layers_the_backbone_lacks_is_refused_naming_the_layer(
    api: Api, r20: Backbone, resnet20_uri: str, tmp_path: Path
) -> None:
    register_r20(api, resnet20_uri)
    t = api.tenant()
    r56 = timm.create_model("resnet56_cifar")  # the same model class, deeper: layer1.5 is not in ResNet-20
    error = _import(api, t, adapter_zip(peft_model(r56, "linear", r"layer1\.5\.conv1"), tmp_path / "r56"))
    assert error["code"] == "layer_mismatch" and error["param"] == "target_modules", error
    assert "layer1.5.conv1" in error["message"], error
    # a layer both have, with another shape (trained on a wider model): named, with both shapes
    wide = peft_model(r20.model, "linear", r"layer1\.0\.conv1")
    folder = tmp_path / "wide"
    wide.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.layer1.0.conv1.lora_A.weight"
    tensors[key] = torch.zeros(4, 32, 3, 3)
    save_file(tensors, folder / "adapter_model.safetensors")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(folder / name, name)
    error = _import(api, t, buf.getvalue())
    assert error["code"] == "layer_mismatch" and "layer1.0.conv1" in error["message"], error
