"""The training loop: frozen backbone, feature cache, resume, cancellation, callbacks, evaluation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.engine import (
    BackboneSpec,
    EngineError,
    MethodError,
    TrainingCancelled,
    TrainResult,
    create_backbone,
    preprocess,
)
from service.engine.backbones import Backbone
from service.engine.data import ValidationReport
from service.engine.layer_search import SearchBudget, auto_select_layer, candidate_layers
from service.engine.methods import ActivationConfig, LinearConfig, MethodConfig, create_method
from service.engine.pipeline import PipelineCallbacks, PreparedData, train_prompt
from service.engine.train import (
    Checkpoint,
    EpochMetrics,
    ProgressEvent,
    TrainCallbacks,
    TrainConfig,
    evaluate,
    fit,
    predict_logits,
)
from tests.signal_data import CLASSES as SIGNAL_CLASSES
from tests.signal_data import square_images

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes whose images differ in mean colour: learnable in a few steps."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 4
    x = torch.randn(48, 3, 32, 32, generator=gen) * 0.5
    x[:, 0] += (y == 1).float()[:, None, None] * 3.0
    x[:, 1] += (y == 2).float()[:, None, None] * 3.0
    x[:, 2] += (y == 3).float()[:, None, None] * 3.0
    return x, y


def _fit(
    bb: Backbone, method: str, cfg: MethodConfig, data: tuple, tcfg: TrainConfig, **kw: Any
) -> TrainResult:
    """`fit` on `data` alone (no validation or test rows), over the test's classes."""
    return fit(bb, method, cfg, data, None, None, tcfg, classes=CLASSES, **kw)


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"epochs": 2, "batch_size": 12, "learning_rate": 1e-2, "seed": 0}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["activation", "input", "linear", "norm", "full"])
def test_training_never_changes_the_backbone(bb: Backbone, data: tuple, method: str) -> None:
    before = bb.parameter_fingerprint()
    cfg = MethodConfig.for_method(method, num_classes=4, prompt_layers=(3,) if method == "activation" else ())
    result = fit(bb, method, cfg, data, None, data, _cfg(epochs=1), classes=CLASSES)
    assert bb.parameter_fingerprint() == before
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert result.metrics["test"]["n"] == len(data[0])


@pytest.fixture(scope="module")
def spatial(bb: Backbone) -> PreparedData:
    """Images whose class is the position of a square: only a prompt can carry it (tests/signal_data.py)."""
    spec = bb.spec
    tensors = []
    for n, seed in ((192, 0), (96, 1)):
        images, labels = square_images(n, seed)
        tensors.append(
            (preprocess(images, bb.input_size, spec.mean or (), spec.std or ()), torch.from_numpy(labels))
        )
    return PreparedData(SIGNAL_CLASSES, tensors[0], tensors[1], tensors[1], ValidationReport(2, {}))


def test_fit_learns_what_only_the_prompt_can_carry(bb: Backbone, spatial: PreparedData) -> None:
    """AP must beat an identically trained linear probe by a wide margin; a prompt never added cannot."""
    epochs: list[EpochMetrics] = []
    budget = _cfg(epochs=10, batch_size=32, learning_rate=3e-2)
    probe = train_prompt(bb, spatial, "linear", config=budget)
    ap = train_prompt(
        bb,
        spatial,
        "activation",
        prompt_layer=2,
        config=budget,
        callbacks=PipelineCallbacks(on_epoch_end=epochs.append),
    )
    ap_acc, probe_acc = ap.accuracy("test"), probe.accuracy("test")
    assert ap_acc is not None and probe_acc is not None
    assert probe_acc < 0.7, f"the data leaks its class to a linear probe ({probe_acc:.3f})"
    assert ap_acc >= probe_acc + 0.25, f"AP {ap_acc:.3f} vs linear probe {probe_acc:.3f}"
    m = ap.metrics
    assert [e.epoch for e in epochs] == list(range(1, 11))
    assert epochs[-1].train_loss < epochs[0].train_loss
    assert m["test"]["top5"] >= m["test"]["top1"]
    assert set(m["test"]["per_class"]) == set(SIGNAL_CLASSES)
    assert m["val"]["top1"] == pytest.approx(epochs[-1].val_accuracy)
    assert m["train_seconds"] > 0 and m["first_layer"] == 2 and ap.layers == [2]
    assert ap.result.artifact.metadata["metrics"]["test"]["top1"] == m["test"]["top1"]


def test_feature_cache_gives_the_same_numbers(bb: Backbone, data: tuple) -> None:
    row_bytes = bb.layers[3].full_params * 4
    runs = {}
    for label, limit in (("off", 0), ("partial", 20 * row_bytes), ("on", 1 << 30)):
        result = fit(
            bb,
            "activation",
            ActivationConfig(4, (3,)),
            data,
            None,
            data,
            _cfg(feature_cache_bytes=limit),
            classes=CLASSES,
        )
        runs[label] = result
    assert runs["off"].metrics["feature_cache"]["rows"] == 0
    assert runs["partial"].metrics["feature_cache"]["rows"] == 20
    assert runs["on"].metrics["feature_cache"]["rows"] == len(data[0])
    for label in ("partial", "on"):
        a, b = runs["off"].artifact.tensors, runs[label].artifact.tensors
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{label}: {k} differs"
        assert runs[label].metrics["test"]["top1"] == runs["off"].metrics["test"]["top1"]


@pytest.mark.parametrize("method", ["activation", "norm"])
def test_resume_from_checkpoint_equals_an_uninterrupted_run(bb: Backbone, data: tuple, method: str) -> None:
    cfg = MethodConfig.for_method(
        method, num_classes=4, prompt_layers=(2, 4) if method == "activation" else ()
    )
    tcfg = _cfg(epochs=3, batch_size=16, warmup_epochs=1.0, optimizer="adamw", weight_decay=0.01)
    checkpoints: list[Checkpoint] = []
    full = _fit(bb, method, cfg, data, tcfg, callbacks=TrainCallbacks(on_checkpoint=checkpoints.append))
    assert [c.epoch for c in checkpoints] == [1, 2, 3]
    restored = Checkpoint.from_bytes(checkpoints[0].to_bytes())  # as a worker would read it back
    resumed = _fit(bb, method, cfg, data, tcfg, resume=restored)
    for k, v in full.artifact.tensors.items():
        assert torch.equal(v, resumed.artifact.tensors[k]), k
    assert len(resumed.metrics["epochs"]) == 3
    # A checkpoint written before configs had a type tag (every option of every method) still resumes.
    legacy = Checkpoint.from_bytes(checkpoints[0].to_bytes())
    old_config = {"prompt_layers": [], "prompt_shape": "full", "input_variant": "pad", "pad_size": None}
    old_config.update({"lora_rank": 4, **cfg.to_dict()})
    del old_config["method"]
    legacy.state["fingerprint"]["method_config"] = old_config
    again = _fit(bb, method, cfg, data, tcfg, resume=legacy)
    for k, v in full.artifact.tensors.items():
        assert torch.equal(v, again.artifact.tensors[k]), k
    legacy.state["fingerprint"]["method_config"] = {**old_config, "num_classes": 3}
    with pytest.raises(MethodError, match="method_config differs"):
        _fit(bb, method, cfg, data, tcfg, resume=legacy)
    # A checkpoint from another run is refused, not silently mixed in.
    with pytest.raises(MethodError):
        _fit(bb, "linear", LinearConfig(4), data, tcfg, resume=restored)


def test_cancellation_stops_within_a_step(bb: Backbone, data: tuple) -> None:
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 4

    with pytest.raises(TrainingCancelled) as info:
        _fit(
            bb,
            "activation",
            ActivationConfig(4, (3,)),
            data,
            _cfg(),
            callbacks=TrainCallbacks(should_stop=should_stop),
        )
    assert calls == 5
    assert info.value.code == "cancelled"


def test_progress_events_are_bounded_and_monotone(bb: Backbone, data: tuple) -> None:
    events: list[ProgressEvent] = []
    _fit(
        bb,
        "linear",
        LinearConfig(4),
        data,
        _cfg(epochs=2, batch_size=2),
        callbacks=TrainCallbacks(on_progress=events.append),
    )
    per_epoch = [sum(e.epoch == k for e in events) for k in (1, 2)]
    assert all(1 <= n <= 11 for n in per_epoch), per_epoch
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert all(e.steps == 24 for e in events)


def test_augmentation_and_sgd_paths(bb: Backbone, spatial: PreparedData) -> None:
    """Augmentation + label smoothing still learn what only the prompt carries (the probe cannot); SGD
    descends (a zero-initialised prompt needs large SGD steps, so its loss is checked, not its accuracy)."""
    cfg = _cfg(epochs=10, batch_size=32, augment=True, label_smoothing=0.1, learning_rate=3e-2)
    result = train_prompt(bb, spatial, "activation", prompt_layer=2, config=cfg)
    assert result.metrics["feature_cache"]["rows"] == 0  # augmentation changes the prefix every epoch
    acc = result.accuracy("test")
    assert acc is not None and acc >= 0.75, acc
    sgd_cfg = _cfg(epochs=4, batch_size=32, optimizer="sgd", learning_rate=1.0)
    history = train_prompt(bb, spatial, "activation", prompt_layer=2, config=sgd_cfg).metrics["epochs"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_fixed_seed_is_deterministic_and_seed_matters(bb: Backbone, data: tuple) -> None:
    runs = [
        _fit(bb, "activation", ActivationConfig(4, (4,)), data, _cfg(epochs=1, seed=s)) for s in (7, 7, 8)
    ]
    assert runs[0].artifact.tensors["delta.4"].equal(runs[1].artifact.tensors["delta.4"])
    assert not runs[0].artifact.tensors["delta.4"].equal(runs[2].artifact.tensors["delta.4"])


def test_bad_hyperparameters_and_labels_fail_clearly(bb: Backbone, data: tuple) -> None:
    with pytest.raises(EngineError) as info:
        TrainConfig(epochs=0, optimizer="adam")
    assert info.value.code == "invalid_hyperparameters" and "optimizer" in str(info.value)
    x, y = data
    with pytest.raises(MethodError, match="labels"):
        fit(bb, "linear", LinearConfig(3), (x, y), None, None, _cfg(), classes=CLASSES[:3])


def test_evaluate_counts_top1_top5_and_per_class(bb: Backbone, data: tuple) -> None:
    module = create_method("linear", bb, LinearConfig(4))
    with torch.no_grad():  # a head that always answers class 0, then 1, 2, 3 in that order
        module.head.weight.zero_()
        module.head.bias.copy_(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    x, y = data
    out = evaluate(module, (x, y), classes=CLASSES)
    assert out["top1"] == pytest.approx(float((y == 0).float().mean()))
    assert out["top5"] == 1.0
    assert out["per_class"] == {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}


def test_auto_layer_search_spans_the_depth_and_keeps_the_prior(bb: Backbone, data: tuple) -> None:
    cands = candidate_layers(bb, 3)
    assert cands[0] == 1 and cands[-1] == bb.num_layers  # from the stem to the last block
    assert bb.recommended_layer in cands and len(cands) <= 4
    budget = SearchBudget(max_candidates=2, max_train=64, max_val=32, epochs=1, batch_size=16)
    best, rows = auto_select_layer(bb, data, None, budget=budget, num_classes=4)
    assert best in [r["index"] for r in rows]
    assert {r["index"] for r in rows} == set(candidate_layers(bb, 2))
    assert max(r["val_accuracy"] for r in rows) == next(r["val_accuracy"] for r in rows if r["index"] == best)
    # Ties go to the layer nearest the family's default (CNN: late; ViT: early).
    vit = create_backbone(BackboneSpec("test_vit", model_kwargs={"img_size": 32}))
    assert vit.recommended_layer in candidate_layers(vit, 3)
    assert candidate_layers(vit, 3)[0] == 1


def test_augment_batch_crops_and_flips_each_image_and_keeps_its_place() -> None:
    """Every output image is a crop of its own input (reflect-padded by 1/8 of the side) or that crop
    mirrored: images are changed, never swapped (so each keeps its label), and the seed decides."""
    from service.engine.train import augment_batch

    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = augment_batch(x, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    pad = 32 // 8
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets, flips = [], []
    for i in range(len(x)):
        found = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if out[i].equal(
                padded[i, :, dy : dy + 32, dx : dx + 32].flip(-1)
                if flip
                else padded[i, :, dy : dy + 32, dx : dx + 32]
            )
        ]
        assert found, f"image {i} is not a crop / flip of input {i}"
        offsets.append(found[0][:2])
        flips.append(found[0][2])
    assert sum(not out[i].equal(x[i]) for i in range(len(x))) >= 40  # almost every image changed
    assert 10 <= sum(flips) <= 38 and len(set(offsets)) >= 10  # both flips, many crop positions
    assert out.equal(augment_batch(x, torch.Generator().manual_seed(5)))
    assert not out.equal(augment_batch(x, torch.Generator().manual_seed(6)))


def test_label_smoothing_changes_the_training_loss_by_the_closed_form_amount(
    bb: Backbone, data: tuple
) -> None:
    """With one step per epoch, epoch 2's loss is the loss of the head saved at the end of epoch 1 on the
    whole training set, so it can be computed here: smoothing eps turns the cross-entropy CE into
    (1 - eps) * CE + eps * U, U being the mean over classes of -log p."""
    x, y = data
    eps = 0.3
    checkpoints: list[Checkpoint] = []
    cfg = _cfg(epochs=2, batch_size=len(x), learning_rate=0.5, label_smoothing=eps)
    result = _fit(
        bb, "linear", LinearConfig(4), data, cfg, callbacks=TrainCallbacks(on_checkpoint=checkpoints.append)
    )
    head = create_method("linear", bb, LinearConfig(4))
    head.load_state_dict(checkpoints[0].state["trainable"])
    logp = torch.log_softmax(predict_logits(head, x), dim=1)
    ce = float(-logp[torch.arange(len(y)), y].mean())
    uniform = float(-logp.mean())
    assert uniform - ce > 0.5  # the head is confident after one large step: the two terms differ
    loss = float(result.metrics["epochs"][1]["train_loss"])
    assert loss == pytest.approx((1 - eps) * ce + eps * uniform, rel=1e-4), (loss, ce, uniform)
