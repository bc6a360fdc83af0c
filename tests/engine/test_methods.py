"""Methods: registry, zero-init identity, where gradients flow, the backbone untouched, norm semantics."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from service.engine import (
    ActivationConfig,
    Backbone,
    BackboneSpec,
    DeepActivationNormConfig,
    FullConfig,
    InputPromptConfig,
    LayerError,
    LinearConfig,
    LoRAConfig,
    MethodConfig,
    MethodError,
    NormConfig,
    PromptArtifact,
    create_backbone,
    create_method,
    list_methods,
    load_module,
    resolve_prompt_layers,
)
from service.engine.methods.input_prompt import frame_mask

TINY: dict[str, dict[str, Any]] = {
    "test_resnet": {"input_size": (32, 32)},
    "test_convnext": {"input_size": (32, 32)},
    "test_vit": {"model_kwargs": {"img_size": 32}},
}


@pytest.fixture(scope="module", params=sorted(TINY))
def backbone(request: pytest.FixtureRequest) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(BackboneSpec(request.param, **TINY[request.param]))


def _images(bb: Backbone, n: int = 6) -> torch.Tensor:
    h, w = bb.input_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def _configs(bb: Backbone) -> list[tuple[str, MethodConfig]]:
    mid = bb.layers[len(bb.layers) // 2].index
    deep = resolve_prompt_layers(bb.layers, "all")
    return [
        ("activation", ActivationConfig(3, (mid,))),
        ("activation", ActivationConfig(3, (mid,), prompt_shape="channel")),
        ("activation", ActivationConfig(3, deep)),
        ("activation", ActivationConfig(3, (0,))),
        ("input", InputPromptConfig(3, input_variant="additive")),
        ("input", InputPromptConfig(3, input_variant="pad")),
        ("linear", LinearConfig(3)),
        ("norm", NormConfig(3)),
        ("full", FullConfig(3)),
        ("deep_activation_norm", DeepActivationNormConfig(3)),
        ("lora", LoRAConfig(3, lora_rank=2)),
    ]


def test_registry_lists_every_method_and_rejects_unknown() -> None:
    assert list_methods() == ["activation", "input", "linear", "norm", "full", "deep_activation_norm", "lora"]
    servable = ["activation", "input", "linear", "norm", "deep_activation_norm", "lora"]
    assert list_methods(servable_only=True) == servable
    bb = create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))
    with pytest.raises(MethodError, match="unknown method 'dora'"):
        create_method("dora", bb, LinearConfig(2))


def test_bad_configs_fail_clearly() -> None:
    bb = create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))
    with pytest.raises(MethodError):
        LinearConfig(0)
    with pytest.raises(MethodError):
        ActivationConfig(2, (1,), prompt_shape="diagonal")
    with pytest.raises(MethodError, match="at least one prompt layer"):
        create_method("activation", bb, ActivationConfig(2))
    with pytest.raises(LayerError):
        create_method("activation", bb, ActivationConfig(2, (len(bb.layers),)))
    with pytest.raises(MethodError, match="pad_size"):
        create_method("input", bb, InputPromptConfig(2, pad_size=16))
    with pytest.raises(MethodError, match="lora_rank"):
        LoRAConfig(2, lora_rank=0)


def test_prompt_sizes_follow_the_catalog(backbone: Backbone) -> None:
    for info in backbone.layers:
        full = create_method("activation", backbone, ActivationConfig(2, (info.index,)))
        chan = create_method(
            "activation", backbone, ActivationConfig(2, (info.index,), prompt_shape="channel")
        )
        head = (backbone.num_features + 1) * 2
        assert full.num_trainable() - head == info.full_params
        assert chan.num_trainable() - head == info.channel_params
        assert full.first_layer == info.index


def test_zero_init_prompts_leave_the_backbone_function_unchanged(backbone: Backbone) -> None:
    """At init every method except the VP frame is the plain backbone plus its head."""
    x = _images(backbone)
    feats = backbone.forward_features(x)
    for name, cfg in _configs(backbone):
        module = create_method(name, backbone, cfg).eval()
        with torch.no_grad():
            got = module(x)
        expected = module.head(feats)
        if name == "input" and cfg.input_variant == "pad":
            assert not torch.allclose(got, expected, atol=1e-4)  # the image is shrunk
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _block_modules(bb: Backbone) -> dict[int, list[nn.Module]]:
    """Modules of each block layer (by the catalog's module path)."""
    named = dict(bb.model.named_modules())
    return {
        info.index: [named[info.name]] for info in bb.layers if info.kind == "block" and info.name in named
    }


@pytest.mark.parametrize("which", ["mid", "last"])
def test_no_gradient_reaches_anything_before_the_prompt(backbone: Backbone, which: str) -> None:
    blocks = _block_modules(backbone)
    assert len(blocks) >= 2
    layer = sorted(blocks)[len(blocks) // 2] if which == "mid" else max(blocks)
    module = create_method("activation", backbone, ActivationConfig(3, (layer,)))
    grad_flag: dict[int, bool] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, i=i: grad_flag.__setitem__(i, out.requires_grad))
        for i, mods in blocks.items()
        for m in mods
    ]
    x = _images(backbone).requires_grad_(True)
    try:
        loss = module(x).logsumexp(1).sum()
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert x.grad is None, "the input received a gradient through a frozen prefix"
    for i, flag in grad_flag.items():
        assert flag == (i > layer), f"layer {i}: requires_grad={flag} with the prompt at {layer}"
    assert all(p.grad is None for p in backbone.model.parameters())
    delta = module.deltas[str(layer)]
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_input_prompt_gets_gradient_through_the_whole_backbone(backbone: Backbone) -> None:
    module = create_method("input", backbone, InputPromptConfig(3))
    x = _images(backbone).requires_grad_(True)
    module(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert module.prompt.grad is not None
    mask = module.mask
    # Only the frame trains: the interior of the prompt gets no gradient.
    assert module.prompt.grad[:, mask[0] == 0].abs().sum() == 0
    assert module.prompt.grad[:, mask[0] == 1].abs().sum() > 0


def test_vp_pad_shrinks_the_image_into_a_learned_frame() -> None:
    bb = create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))
    module = create_method("input", bb, InputPromptConfig(2, pad_size=4))
    with torch.no_grad():
        module.prompt.fill_(7.0)
        x = torch.full((1, 3, 32, 32), 2.0)
        out = module.enter(x)
    frame = frame_mask((32, 32), 4)[0].bool()
    assert int(frame.sum()) == 32 * 32 - 24 * 24
    assert torch.all(out[0][:, frame] == 7.0)
    torch.testing.assert_close(out[0][:, ~frame], torch.full((3, 24, 24), 2.0).flatten(1))


def test_norm_tune_equals_tuning_the_affine_parameters() -> None:
    """y * (1 + s) + t on a BN output == a BN with weight*(1+s), bias*(1+s)+t."""
    bb = create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))
    module = create_method("norm", bb, NormConfig(3)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (*module.scales, *module.shifts):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    tuned = copy.deepcopy(bb.model)
    named = dict(tuned.named_modules())
    with torch.no_grad():
        for k, info in enumerate(bb.norm_layers):
            norm = named[info.name]
            s, t = module.scales[k], module.shifts[k]
            norm.bias.copy_(norm.bias * (1 + s) + t)
            norm.weight.mul_(1 + s)
    reference = Backbone(bb.spec, tuned, bb.device)
    x = _images(bb)
    with torch.no_grad():
        got = module(x)
        expected = module.head(reference.forward_features(x))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, module.head(bb.forward_features(x)), atol=1e-3)


def test_full_fine_tuning_copies_and_never_touches_the_shared_backbone() -> None:
    bb = create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))
    before = bb.parameter_fingerprint()
    module = create_method("full", bb, FullConfig(2))
    assert module.num_trainable() > sum(p.numel() for p in bb.model.parameters())
    bn = [m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bn]
    module.train()
    assert bn and not module.model.training and module.head.training  # BN statistics stay frozen
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
    module(_images(bb)).sum().backward()
    opt.step()
    assert all(
        torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        for m, (mean, var) in zip(bn, stats, strict=True)
    )
    assert bb.parameter_fingerprint() == before
    assert not module.servable


def test_lora_adapts_a_private_copy_through_peft(backbone: Backbone) -> None:
    """peft LoRA factors on every ungrouped conv (CNN) or the block qkv/proj/fc1/fc2 (ViT); the shared
    model stays."""
    before = backbone.parameter_fingerprint()
    module = create_method("lora", backbone, LoRAConfig(3, lora_rank=2))
    if backbone.family == "vit":
        assert module.targets and all(
            t.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") for t in module.targets
        )
        assert all(t.startswith("blocks.") for t in module.targets)  # not the patch embedding's proj
    else:
        convs = [n for n, m in backbone.model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        assert module.targets == convs
    trainable = dict((n, p) for n, p in module.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    expected = sum(2 * p.numel() for p in module.head.parameters()) // 2
    assert module.num_trainable() > expected  # adapters plus the head
    module.train()
    assert not module.model.training  # BN statistics stay frozen
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    for _ in range(2):  # B starts at zero: the second step moves the output through A as well
        opt.zero_grad()
        module(_images(backbone)).logsumexp(1).sum().backward()
        opt.step()
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)
    assert backbone.parameter_fingerprint() == before
    assert module.servable  # served per row on the shared backbone, not through this copy
    # The artifact carries the adapters: a rebuilt module predicts the same.
    art = PromptArtifact.from_module(module, classes=["a", "b", "c"])
    assert any(k.startswith("lora.") for k in art.tensors)
    rebuilt = load_module(PromptArtifact.from_bytes(art.to_bytes()), backbone)
    x = _images(backbone)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), module(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(module(x), module.head(backbone.forward_features(x)), atol=1e-4)


def test_deep_activation_norm_is_deep_ap_and_norm_tune_at_once(backbone: Backbone) -> None:
    """Its deltas act like deep AP's and its affine like norm-tune's; together they compose."""
    deep = resolve_prompt_layers(backbone.layers, "all")
    both = create_method("deep_activation_norm", backbone, DeepActivationNormConfig(3)).eval()
    assert both.prompt_layers == deep and both.servable
    ap = create_method("activation", backbone, ActivationConfig(3, deep)).eval()
    norm = create_method("norm", backbone, NormConfig(3)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k in ap.deltas:
            ap.deltas[k].copy_(0.1 * torch.randn(ap.deltas[k].shape, generator=gen))
        for p in (*norm.scales, *norm.shifts):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        norm.head.load_state_dict(ap.head.state_dict())
        both.head.load_state_dict(ap.head.state_dict())
    x = _images(backbone)
    with torch.no_grad():
        both.load_tensors({**ap.export_tensors(), **{k: v for k, v in norm.export_tensors().items()}})
        out = both(x)
        with_deltas_only = create_method("deep_activation_norm", backbone, DeepActivationNormConfig(3)).eval()
        with_deltas_only.load_tensors({**norm.export_tensors(), **ap.export_tensors()})
        for p in (*with_deltas_only.scales, *with_deltas_only.shifts):
            p.zero_()
        torch.testing.assert_close(with_deltas_only(x), ap(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, ap(x), atol=1e-4)
        assert not torch.allclose(out, norm(x), atol=1e-4)
    # Gradients reach both parts in one backward pass.
    both.train()
    both(x).logsumexp(1).sum().backward()
    assert all(both.deltas[k].grad is not None for k in both.deltas)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in both.scales)
