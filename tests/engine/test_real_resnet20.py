"""One short real run: ResNet-20 (CIFAR-10 weights) adapted to GTSRB-43 by an activation prompt.

AP at the output of the middle stage must land far above chance (2.3 %) and above a linear probe
trained on the same images with the same budget; the backbone must come out bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine import BackboneSpec, create_backbone
from service.engine.backbones import Backbone
from service.engine.data import preprocess
from service.engine.methods import MethodConfig
from service.engine.train import TrainConfig, fit

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 2000, 1000
MIDDLE = "layer2.2"  # output of the middle stage (32 x 16 x 16)


def _subset(data_dir: Path, bb: Backbone) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """A seeded random subset (the file is sorted by class), normalised with the backbone's mean/std."""
    d = np.load(data_dir / "gtsrb32.npz")
    rng = np.random.default_rng(0)
    out = []
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        idx = np.sort(rng.permutation(len(d[f"y_{split}"]))[:n])
        x = preprocess(d[f"x_{split}"][idx], bb.input_size, bb.spec.mean, bb.spec.std)  # type: ignore[arg-type]
        out.append((x, torch.from_numpy(d[f"y_{split}"][idx]).long()))
    return tuple(out)


def test_activation_prompt_beats_linear_probe_on_gtsrb(weights_dir: Path, data_dir: Path) -> None:
    bb = create_backbone(
        BackboneSpec("resnet20_cifar", weights=(weights_dir / "resnet20-12fca82f.th").as_uri())
    )
    train, test = _subset(data_dir, bb)
    classes = [str(c) for c in np.load(data_dir / "gtsrb32.npz")["classes"]]
    assert len(classes) == 43
    layer = next(info.index for info in bb.layers if info.name == MIDDLE)
    before = bb.parameter_fingerprint()
    budget = TrainConfig(epochs=4, batch_size=64, learning_rate=1e-2, optimizer="adamw", seed=0)

    ap = fit(bb, "activation", MethodConfig(43, (layer,)), train, None, test, budget, classes=classes)
    probe = fit(bb, "linear", MethodConfig(43), train, None, test, budget, classes=classes)

    ap_acc, probe_acc = ap.metrics["test"]["top1"], probe.metrics["test"]["top1"]
    print(f"AP@{MIDDLE}: {ap_acc:.3f} ({ap.metrics['train_seconds']:.1f} s), linear probe: {probe_acc:.3f}")
    assert ap_acc > 10 * (1 / 43), f"AP at {MIDDLE} only reached {ap_acc:.3f}"
    assert ap_acc > probe_acc + 0.02, f"AP {ap_acc:.3f} does not beat the linear probe {probe_acc:.3f}"
    assert bb.parameter_fingerprint() == before
