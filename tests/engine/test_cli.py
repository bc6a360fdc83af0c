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
from tests.signal_data import CLASSES as SIGNAL_CLASSES
from tests.signal_data import square_images


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
    """On data only a prompt can learn (tests/signal_data.py): a prompt never added scores like chance."""
    x, y = square_images(192, seed=0)
    np.savez(tmp_path / "signal.npz", x_train=x, y_train=y, classes=np.array(SIGNAL_CLASSES))
    out = tmp_path / "prompt.safetensors"
    dataset = str(tmp_path / "signal.npz")
    args = ["train", "--backbone", "test_resnet", "--input-size", "32", "--dataset", dataset,
            "--out", str(out), "--layer", "2", "--epochs", "10", "--batch-size", "32",
            "--lr", "0.03"]  # fmt: skip
    # weights="random" draws from the global RNG: seed it so train and predict build the same backbone.
    torch.manual_seed(0)
    assert main(args) == 0
    assert "val: top-1" in capsys.readouterr().out
    artifact = PromptArtifact.from_bytes(out.read_bytes())
    assert artifact.prompt_layers == (2,) and artifact.classes == SIGNAL_CLASSES

    images, labels = square_images(40, seed=7)  # held out
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    torch.manual_seed(0)
    assert main(["predict", str(out), *paths, "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in preds] == paths
    for p in preds:
        probs = [q["probability"] for q in p["predictions"]]
        assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-4
    correct = sum(
        p["predictions"][0]["label"] == SIGNAL_CLASSES[y] for p, y in zip(preds, labels, strict=True)
    )
    assert correct >= 32, f"{correct}/40 held-out images right"


def test_predict_rejects_a_corrupt_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(bad), str(tmp_path / "a.png")]) == 2
    assert "corrupt artifact" in capsys.readouterr().err
