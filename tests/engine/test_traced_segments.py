"""The engine's traced segments compute exactly what the eager ones do, and stand aside when they can't."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from service.engine import BackboneSpec, create_backbone
from service.engine.backbones import OPTIMISED_TOLERANCE
from service.engine.mixed_batch import PromptBank, forward_mixed

SPECS = [
    BackboneSpec("resnet20_cifar", weights="random"),
    BackboneSpec("test_vit", weights="random", model_kwargs={"img_size": 32}),
    BackboneSpec("mobilenetv2_050", weights="random", model_kwargs={"num_classes": 10}),
]


def _eager_and_traced(spec: BackboneSpec) -> tuple[Any, Any]:
    eager, traced = create_backbone(spec), create_backbone(spec)
    assert traced.trace_segments()
    return eager, traced


def _prompted_passes(eager: Any, traced: Any, seed: int) -> Iterator[tuple[torch.Tensor, Any, Any]]:
    """(images, eager features, traced features) of a pass with an activation prompt at the recommended
    layer, for 1 and 5 images (sizes the trace never saw)."""
    gen = torch.Generator().manual_seed(seed)
    layer = eager.recommended_layer
    for n in (1, 5):
        x = torch.randn(n, 3, *eager.input_size, generator=gen)
        delta = torch.randn(*eager.layers[layer].shape, generator=gen)

        def add(i: int, h: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
            return h + delta if i == layer else h

        with torch.inference_mode():
            want = eager.run(x, 0, eager.pooled_index, layer_fn=add)
            got = traced.run(x, 0, traced.pooled_index, layer_fn=add)
        yield x, want, got


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.model)
def test_a_traced_pass_equals_the_eager_one_bit_for_bit(spec: BackboneSpec) -> None:
    eager, traced = _eager_and_traced(spec)
    layer = eager.recommended_layer
    for x, want, got in _prompted_passes(eager, traced, seed=0):
        assert torch.equal(got, want)
        with torch.inference_mode():
            mid = traced.run(traced.run(x, 0, layer), layer, traced.pooled_index)  # a pass in two parts
            assert torch.equal(mid, eager.run(x, 0, eager.pooled_index))


def test_rewrites_inside_a_layer_and_training_take_the_eager_path() -> None:
    _, traced = _eager_and_traced(SPECS[0])
    x = torch.randn(2, 3, 32, 32)
    seen: list[str] = []

    def norm_fn(name: str, y: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return y * 2.0

    with torch.inference_mode():
        plain = traced.run(x, 0, traced.pooled_index)
        rewritten = traced.run(x, 0, traced.pooled_index, norm_fn=norm_fn)
    assert len(seen) == len(traced.norm_layers) and not torch.equal(plain, rewritten)
    x.requires_grad_(True)
    with torch.enable_grad():  # training: the eager modules, so the graph reaches every op
        traced.run(x, 0, traced.pooled_index).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_trace_that_differs_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    bb = create_backbone(SPECS[0])
    real_trace = torch.jit.trace

    def off_by_a_little(fn: Any, example: Any, **kw: Any) -> Any:
        traced = real_trace(fn, example, **kw)
        return lambda h: traced(h) + 1e-6

    monkeypatch.setattr(torch.jit, "trace", off_by_a_little)
    assert not bb.trace_segments()
    assert bb._traced is None


def test_the_mixed_batch_of_a_traced_backbone_matches_the_eager_one() -> None:
    from bench.synthetic import random_artifact

    eager, traced = _eager_and_traced(SPECS[0])
    arts = [random_artifact(eager, layers=[layer], num_classes=7, seed=layer) for layer in (0, 3, 8)]
    x = torch.randn(6, 3, 32, 32)
    slots = [0, 1, 2, 2, 0, 1]
    out = []
    for bb in (eager, traced):
        bank = PromptBank(bb, capacity=4, max_classes=8)
        for slot, art in enumerate(arts):
            bank.write(slot, art)
        out.append(forward_mixed(bb, bank, x, slots))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.model)
def test_optimised_traces_stay_within_tolerance_of_the_eager_pass(spec: BackboneSpec) -> None:
    eager, optimised = create_backbone(spec), create_backbone(spec)
    assert optimised.trace_segments(optimise=True)
    for _, want, got in _prompted_passes(eager, optimised, seed=1):
        assert (got - want).abs().max() <= OPTIMISED_TOLERANCE * want.abs().max()


def test_optimised_resnet_traces_fold_the_norms_and_run_channels_last() -> None:
    bb = create_backbone(SPECS[0])
    assert bb.trace_segments(optimise=True)
    assert bb._traced is not None
    # the residual stages are modules (the stem traces as a plain function, which freezing cannot take)
    stages = [seg for seg in bb._traced[0] if isinstance(seg, torch.jit.ScriptModule)]
    graphs = "".join(str(seg.graph) for seg in stages)
    assert len(stages) >= 9 and "_fused_bn" in graphs
    assert "batch_norm" not in graphs
    weights = [
        node.output().toIValue()
        for seg in stages
        for node in seg.graph.findAllNodes("prim::Constant")
        if node.output().type().kind() == "TensorType"
    ]
    kernels = [w for w in weights if w.dim() == 4]
    assert len(kernels) >= 18
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in kernels)


def test_optimising_leaves_the_eager_modules_as_they_were() -> None:
    """The traces take a channels-last copy: training and norm-tune passes still run the modules as built."""
    plain, optimised = create_backbone(SPECS[0]), create_backbone(SPECS[0])
    assert optimised.trace_segments(optimise=True)
    assert all(p.is_contiguous() for p in optimised.model.parameters())
    assert optimised.parameter_fingerprint() == plain.parameter_fingerprint()
    x = torch.randn(3, 3, 32, 32)
    with torch.enable_grad():  # the eager path
        assert torch.equal(optimised.run(x, 0, optimised.pooled_index), plain.run(x, 0, plain.pooled_index))


def test_an_optimised_trace_that_strays_past_the_tolerance_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bb = create_backbone(SPECS[0])
    real_freeze = torch.jit.freeze

    def off_by_more(module: Any, *args: Any, **kw: Any) -> Any:
        frozen = real_freeze(module, *args, **kw)
        return lambda h: frozen(h) * (1 + 10 * OPTIMISED_TOLERANCE)

    monkeypatch.setattr(torch.jit, "freeze", off_by_more)
    assert not bb.trace_segments(optimise=True)
    assert bb._traced is None
