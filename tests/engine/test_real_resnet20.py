"""One short real run: ResNet-20 (CIFAR-10 weights) adapted to GTSRB-43 by an activation prompt.

AP at the output of the middle stage must land far above chance (2.3 %) and above a linear probe
trained on the same images with the same budget; the backbone must come out bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.engine import BackboneSpec, create_backbone
from service.engine.pipeline import SplitSpec, prepare_dataset, train_prompt
from service.engine.train import TrainConfig

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 2000, 1000
MIDDLE = "layer2.2"  # output of the middle stage (32 x 16 x 16)


def test_activation_prompt_beats_linear_probe_on_gtsrb(weights_dir: Path, data_dir: Path) -> None:
    bb = create_backbone(
        BackboneSpec("resnet20_cifar", weights=(weights_dir / "resnet20-12fca82f.th").as_uri())
    )
    data = prepare_dataset(
        data_dir / "gtsrb32.npz", bb, SplitSpec(seed=0, n_train=N_TRAIN, n_val=0, n_test=N_TEST)
    )
    assert data.num_classes == 43
    before = bb.parameter_fingerprint()
    budget = TrainConfig(epochs=4, batch_size=64, learning_rate=1e-2, optimizer="adamw", seed=0)

    probe = train_prompt(bb, data, "linear", config=budget)
    probe_acc = probe.accuracy("test")
    assert probe_acc is not None
    # the layer a user gets by default (the recommended one) and the middle stage, by name
    for request in (None, MIDDLE):
        ap = train_prompt(bb, data, "activation", prompt_layer=request, config=budget)
        ap_acc = ap.accuracy("test")
        assert ap_acc is not None
        print(f"AP@{ap.layers}: {ap_acc:.3f} ({ap.metrics['train_seconds']:.1f} s), probe: {probe_acc:.3f}")
        assert ap_acc > 10 * (1 / 43), f"AP at {ap.layers} only reached {ap_acc:.3f}"
        assert ap_acc > probe_acc + 0.02, f"AP {ap_acc:.3f} does not beat the linear probe {probe_acc:.3f}"
    assert bb.parameter_fingerprint() == before
