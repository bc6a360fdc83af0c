"""`actprompt layers | train | predict` end to end on tiny random models and a tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.cli import main
from service.engine.artifacts import PromptArtifact


def test_layers_json_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "test_resnet", "--input-size", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert rows[0]["name"] == "input" and rows[0]["shape"] == [3, 32, 32]
    for r in rows:
        assert {"index", "name", "shape", "full_params", "channel_params", "recommended"} <= r.keys()
        assert r["full_params"] == int(np.prod(r["shape"]))
    assert sum(r["recommended"] for r in rows) == 1


def test_layers_table_and_vit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "test_vit"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0" in out and "patch_embed" in out and "recommended" in out


def test_layers_unknown_model_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "no_such_model_xyz"]) == 2
    assert "no_such_model_xyz" in capsys.readouterr().err


def test_train_then_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.integers(0, 100, size=(40, 32, 32, 3), dtype=np.uint8)
    x[y == 1, :, :, 0] += 150  # class "red" is red
    np.savez(tmp_path / "tiny.npz", x_train=x, y_train=y, classes=np.array(["gray", "red"]))
    out = tmp_path / "prompt.safetensors"
    dataset = str(tmp_path / "tiny.npz")
    args = ["train", "--backbone", "test_resnet", "--input-size", "32", "--dataset", dataset,
            "--out", str(out), "--layer", "3", "--epochs", "6", "--batch-size", "8",
            "--lr", "0.05"]  # fmt: skip
    # weights="random" draws from the global RNG: seed it so train and predict build the same backbone.
    torch.manual_seed(0)
    assert main(args) == 0
    assert "val: top-1" in capsys.readouterr().out
    artifact = PromptArtifact.from_bytes(out.read_bytes())
    assert artifact.prompt_layers == (3,) and artifact.classes == ["gray", "red"]

    gray = rng.integers(0, 100, size=(32, 32, 3), dtype=np.uint8)
    red = gray.copy()
    red[..., 0] += 150
    Image.fromarray(red).save(tmp_path / "red.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    torch.manual_seed(0)
    assert main(["predict", str(out), str(tmp_path / "red.png"), str(tmp_path / "gray.png"), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in preds] == [str(tmp_path / "red.png"), str(tmp_path / "gray.png")]
    for p in preds:
        probs = [q["probability"] for q in p["predictions"]]
        assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-4
    assert preds[0]["predictions"][0]["label"] == "red"
    assert preds[1]["predictions"][0]["label"] == "gray"


def test_predict_rejects_a_corrupt_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(bad), str(tmp_path / "a.png")]) == 2
    assert "corrupt artifact" in capsys.readouterr().err
