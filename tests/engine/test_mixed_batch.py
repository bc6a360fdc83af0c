"""Heterogeneous batches: one pass over rows with different prompts equals scoring each row alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.engine import ArtifactError, Backbone, BackboneSpec, create_backbone
from service.engine.artifacts import PromptArtifact
from service.engine.layers import resolve_prompt_layers
from service.engine.methods import (
    ActivationConfig,
    DeepActivationNormConfig,
    FullConfig,
    InputPromptConfig,
    LinearConfig,
    MethodConfig,
    NormConfig,
    create_method,
)
from service.engine.mixed_batch import PromptBank, forward_mixed, forward_multi, predict_single

TINY: dict[str, dict[str, Any]] = {
    "test_resnet": {"input_size": (32, 32)},
    "test_convnext": {"input_size": (32, 32)},
    "test_vit": {"model_kwargs": {"img_size": 32}},
}


@pytest.fixture(scope="module", params=sorted(TINY))
def bb(request: pytest.FixtureRequest) -> Backbone:
    return create_backbone(BackboneSpec(request.param, **TINY[request.param]))


def random_artifact(bb: Backbone, method: str, cfg: MethodConfig, seed: int) -> PromptArtifact:
    """An artifact with random (non-zero) prompt and head tensors, as if trained."""
    module = create_method(method, bb, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return PromptArtifact.from_module(module, classes=[f"c{i}" for i in range(cfg.num_classes)])


@pytest.fixture(scope="module")
def arts(bb: Backbone) -> list[PromptArtifact]:
    return mix(bb)


def mix(bb: Backbone) -> list[PromptArtifact]:
    blocks = resolve_prompt_layers(bb.layers, "all")
    mid, late = blocks[len(blocks) // 2], blocks[-1]
    specs = [
        ("activation", ActivationConfig(3, (mid,))),
        ("activation", ActivationConfig(5, (late,), prompt_shape="channel")),
        ("activation", ActivationConfig(2, blocks)),  # deep AP
        ("activation", ActivationConfig(4, (1, mid))),
        ("activation", ActivationConfig(6, (0,))),
        ("input", InputPromptConfig(7, input_variant="pad")),
        ("input", InputPromptConfig(3, input_variant="pad", pad_size=2)),
        ("input", InputPromptConfig(2, input_variant="additive")),
        ("linear", LinearConfig(4)),
        ("norm", NormConfig(5)),
        ("deep_activation_norm", DeepActivationNormConfig(4)),  # every block delta + the norm affine
        ("deep_activation_norm", DeepActivationNormConfig(3, (mid,), prompt_shape="channel")),
    ]
    return [random_artifact(bb, m, c, seed) for seed, (m, c) in enumerate(specs)]


def _images(bb: Backbone, n: int) -> torch.Tensor:
    return torch.randn(n, 3, *bb.input_size, generator=torch.Generator().manual_seed(99))


def _per_row(
    bb: Backbone, arts: list[PromptArtifact], x: torch.Tensor, slots: list[int]
) -> list[torch.Tensor]:
    return [predict_single(bb, arts[s], x[i : i + 1])[0] for i, s in enumerate(slots)]


def test_mixed_batch_equals_per_row_scoring(bb: Backbone, arts: list[PromptArtifact]) -> None:
    bank = PromptBank(bb, capacity=12, max_classes=8)
    for slot, art in enumerate(arts):
        assert bank.write(slot, art) > 0
    slots = [(5 * i + 1) % len(arts) for i in range(16)]  # every slot, interleaved
    x = _images(bb, len(slots))
    logits = forward_mixed(bb, bank, x, torch.tensor(slots))
    assert logits.shape == (len(slots), 8)
    for i, ref in enumerate(_per_row(bb, arts, x, slots)):
        k = ref.shape[0]
        assert (logits[i, :k] - ref).abs().max().item() <= 1e-5, f"row {i} ({arts[slots[i]].method})"
        assert torch.isneginf(logits[i, k:]).all()


def test_rows_are_independent_of_their_neighbours(bb: Backbone, arts: list[PromptArtifact]) -> None:
    """A row scores the same whatever else shares its batch (deep AP next to VP next to norm)."""
    bank = PromptBank(bb, capacity=len(arts), max_classes=8)
    for slot, art in enumerate(arts):
        bank.write(slot, art)
    x = _images(bb, 4)
    alone = forward_mixed(bb, bank, x, [2, 2, 2, 2])
    mixed = forward_mixed(bb, bank, x, [2, 5, 2, 9])
    torch.testing.assert_close(mixed[[0, 2]], alone[[0, 2]], atol=1e-5, rtol=0)


def test_one_forward_pass_per_batch(bb: Backbone, arts: list[PromptArtifact]) -> None:
    bank = PromptBank(bb, capacity=len(arts), max_classes=8)
    for slot, art in enumerate(arts):
        bank.write(slot, art)
    calls: list[int] = []
    first_block = next(m for n, m in bb.model.named_modules() if n == bb.layers[2].name)
    handle = first_block.register_forward_hook(lambda _m, i, _o: calls.append(i[0].shape[0]))
    try:
        forward_mixed(bb, bank, _images(bb, 10), list(range(10)))
    finally:
        handle.remove()
    assert calls == [10]


def test_forward_multi_runs_the_prefix_once_and_equals_mixed(bb: Backbone) -> None:
    blocks = resolve_prompt_layers(bb.layers, "all")
    arts = [
        random_artifact(bb, "activation", ActivationConfig(3, (blocks[-1],)), 1),
        random_artifact(bb, "activation", ActivationConfig(4, (blocks[-2],), prompt_shape="channel"), 2),
        random_artifact(bb, "linear", LinearConfig(2), 3),
    ]
    bank = PromptBank(bb, capacity=4, max_classes=4)
    for slot, art in enumerate(arts):
        bank.write(slot, art)
    assert bank.first_layer([0, 1, 2]) == blocks[-2]
    x = _images(bb, 3)
    stem_calls: list[int] = []
    first_block = next(m for n, m in bb.model.named_modules() if n == bb.layers[2].name)
    handle = first_block.register_forward_hook(lambda _m, i, _o: stem_calls.append(i[0].shape[0]))
    try:
        multi = forward_multi(bb, bank, x, [0, 1, 2])  # [P, N, Kmax]
    finally:
        handle.remove()
    assert stem_calls == [3]  # the shared prefix saw the 3 images once, not 9 rows
    assert multi.shape == (3, 3, 4)
    for p in range(3):
        torch.testing.assert_close(multi[p], forward_mixed(bb, bank, x, [p] * 3), atol=1e-5, rtol=0)


def test_rewriting_and_clearing_a_slot_leaves_nothing_behind(bb: Backbone) -> None:
    blocks = resolve_prompt_layers(bb.layers, "all")
    deep = random_artifact(bb, "activation", ActivationConfig(3, blocks), 1)
    vp = random_artifact(bb, "input", InputPromptConfig(3), 2)
    norm = random_artifact(bb, "norm", NormConfig(3), 3)
    probe = random_artifact(bb, "linear", LinearConfig(2), 4)
    deep_norm = random_artifact(bb, "deep_activation_norm", DeepActivationNormConfig(3), 5)
    bank = PromptBank(bb, capacity=2, max_classes=3)
    x = _images(bb, 2)
    for old in (deep, vp, norm, deep_norm):
        bank.write(0, old)
        bank.write(0, probe)  # replaces every trace of the old prompt
        bank.write(1, old)  # and the neighbour slot keeps its own
        out = forward_mixed(bb, bank, x, [0, 1])
        torch.testing.assert_close(out[0, :2], predict_single(bb, probe, x[:1])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], predict_single(bb, old, x[1:])[0], atol=1e-5, rtol=0)
        bank.clear(1)
    bank.clear(0)
    assert not bank.occupied(0)
    with pytest.raises(ArtifactError, match="holds no prompt"):
        forward_mixed(bb, bank, x, [0, 0])


def test_bank_rejects_what_it_cannot_serve(bb: Backbone) -> None:
    bank = PromptBank(bb, capacity=2, max_classes=3)
    with pytest.raises(ArtifactError, match="cannot be served"):
        bank.write(0, random_artifact(bb, "full", FullConfig(2), 0))
    with pytest.raises(ArtifactError, match="at most 3"):
        bank.write(0, random_artifact(bb, "linear", LinearConfig(4), 0))
    other = create_backbone(BackboneSpec("test_resnet", input_size=(48, 48)))
    with pytest.raises(ArtifactError, match="trained on backbone"):
        bank.write(0, random_artifact(other, "linear", LinearConfig(2), 0))
    with pytest.raises(IndexError):
        bank.write(2, random_artifact(bb, "linear", LinearConfig(2), 0))


def test_layer_tables_grow_with_use_and_recycle_rows(bb: Backbone) -> None:
    """Delta tables hold rows only for slots prompting there; cleared rows are reused, not leaked."""
    blocks = resolve_prompt_layers(bb.layers, "all")
    layer = blocks[-1]
    arts = [random_artifact(bb, "activation", ActivationConfig(2, (layer,)), seed) for seed in range(7)]
    bank = PromptBank(bb, capacity=64, max_classes=2)
    for slot, art in enumerate(arts):
        bank.write(slot * 9, art)
    table = bank.deltas[layer]
    assert set(bank.deltas) == {layer}
    # one row per prompting slot at least, and it grew on demand: fewer rows than the bank has slots
    assert len(arts) <= table.data.shape[0] < bank.capacity
    rows_before = table.data.shape[0]
    for slot in range(0, 63, 9):
        bank.clear(slot)
    for slot, art in enumerate(arts):
        bank.write(slot + 1, art)
    assert table.data.shape[0] == rows_before
    x = _images(bb, 7)
    out = forward_mixed(bb, bank, x, list(range(1, 8)))
    for i in range(7):
        torch.testing.assert_close(out[i], predict_single(bb, arts[i], x[i : i + 1])[0], atol=1e-5, rtol=0)
