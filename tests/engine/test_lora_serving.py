"""LoRA served per row: in one mixed pass on the shared backbone, each row equals its own adapter's peft
forward, next to activation, norm and VP rows; the artifact holds the factors in PEFT's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine import ArtifactError, Backbone, BackboneSpec, MethodError, create_backbone
from service.engine.artifacts import PromptArtifact, load_module
from service.engine.layers import resolve_prompt_layers
from service.engine.lora_rows import CONV_MODES
from service.engine.methods import (
    ActivationConfig,
    InputPromptConfig,
    LoRAConfig,
    MethodConfig,
    NormConfig,
    PromptModule,
    create_method,
)
from service.engine.methods.lora import lora_key, lora_targets
from service.engine.mixed_batch import PromptBank, forward_mixed, forward_multi

#: Every row within this of its own peft forward (absolute, plus the same relative to the logit: fp32
#: sums over a deep network differ in the last bits when the order of additions differs).
TOL = {"atol": 1e-5, "rtol": 1e-5}
#: MobileNetV2 (folded BN, logits up to ~16, 17 inverted-residual blocks) drifts up to ~3e-5 between the
#: two summation orders depending on the thread count; a row that used another row's adapter differs by
#: ~1e-2, so 1e-4 still separates right from wrong by two orders of magnitude.
DEEP_TOL = {"atol": 1e-4, "rtol": 1e-5}


def tol(bb: Backbone) -> dict[str, float]:
    return DEEP_TOL if bb.spec.model == "mobilenetv2_100" else TOL


def _spec(name: str, weights_dir: Path) -> BackboneSpec:
    if name == "mobilenetv2_100":  # the benchmark's MobileNetV2 ("same" padding), at 64 px to stay quick
        uri = (weights_dir / "mobilenetv2_100_tflite_dequant.safetensors").as_uri()
        kwargs: dict[str, Any] = {"pad_type": "same", "num_classes": 1001}
        return BackboneSpec(
            name, weights=uri, model_kwargs=kwargs, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(64, 64)
        )
    if name == "test_vit":  # a timm ViT, random weights
        return BackboneSpec(name, model_kwargs={"img_size": 32})
    files = {
        "resnet20_cifar": "resnet20-12fca82f.th",
        "resnet56_cifar": "resnet56-4bfd9763.th",
        "vit_cifar10_p4_d128_l6": "vit_cifar10_p4_d128_l6.safetensors",
    }
    return BackboneSpec(name, weights=(weights_dir / files[name]).as_uri())


BACKBONES = ["resnet20_cifar", "resnet56_cifar", "mobilenetv2_100", "vit_cifar10_p4_d128_l6", "test_vit"]


@pytest.fixture(scope="module", params=BACKBONES)
def bb(request: pytest.FixtureRequest, weights_dir: Path) -> Backbone:
    return create_backbone(_spec(request.param, weights_dir))


def _filled(bb: Backbone, method: str, cfg: MethodConfig, seed: int, scale: float) -> PromptArtifact:
    """An artifact with seeded random trainable tensors (LoRA's B included, so every update acts)."""
    module = create_method(method, bb, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return PromptArtifact.from_module(module, classes=[f"c{i}" for i in range(cfg.num_classes)])


def adapters(bb: Backbone) -> list[PromptArtifact]:
    """Three LoRA adapters that differ in rank, alpha and targets, then AP, norm-tune and VP rows."""
    targets = lora_targets(bb)
    mid = resolve_prompt_layers(bb.layers, "all")[len(bb.layers) // 2 - 1]
    specs: list[tuple[str, MethodConfig, float]] = [
        ("lora", LoRAConfig(3, lora_rank=2), 0.05),
        ("lora", LoRAConfig(4, lora_rank=4, lora_alpha=8), 0.03),
        ("lora", LoRAConfig(5, lora_rank=3, target_modules=tuple(targets[::2])), 0.05),
        ("activation", ActivationConfig(4, (mid,)), 0.3),
        ("norm", NormConfig(3), 0.1),
        ("input", InputPromptConfig(2, input_variant="pad", pad_size=2), 0.3),
    ]
    return [_filled(bb, m, c, seed, s) for seed, (m, c, s) in enumerate(specs)]


@pytest.fixture(scope="module")
def arts(bb: Backbone) -> list[PromptArtifact]:
    return adapters(bb)


def _images(bb: Backbone, n: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, *bb.input_size, generator=torch.Generator().manual_seed(seed))


def _bank(bb: Backbone, arts: list[PromptArtifact]) -> PromptBank:
    bank = PromptBank(bb, len(arts) + 2, max_classes=6)
    for slot, art in enumerate(arts):
        bank.write(slot, art)
    return bank


_MODULES: dict[tuple[int, str], PromptModule] = {}


def _own_forward(bb: Backbone, arts: list[PromptArtifact], x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Each row through its own artifact's module (for LoRA: the peft-injected copy), padded to 6 classes."""
    out = torch.full((len(slots), 6), float("-inf"))
    for s in set(slots):
        rows = [i for i, t in enumerate(slots) if t == s]
        key = (id(bb), arts[s].sha256)
        if key not in _MODULES:  # a LoRA module copies the backbone: build each once
            _MODULES[key] = load_module(arts[s], bb)
        with torch.no_grad():
            logits = _MODULES[key](x[rows])
        out[rows, : logits.shape[1]] = logits
    return out


def test_every_row_equals_its_own_adapters_peft_forward(bb: Backbone, arts: list[PromptArtifact]) -> None:
    slots = [0, 3, 1, 4, 2, 5, 0, 1, 2, 1]  # LoRA rows between AP, norm and VP rows
    x = _images(bb, len(slots))
    bank = _bank(bb, arts)
    mixed = forward_mixed(bb, bank, x, slots)
    want = _own_forward(bb, arts, x, slots)
    torch.testing.assert_close(mixed, want, **tol(bb))
    # and a batch of LoRA rows only (every row acts at every module the first adapter adapts)
    lora_only = [1, 0, 2, 0, 1, 1]
    torch.testing.assert_close(
        forward_mixed(bb, bank, x[:6], lora_only), _own_forward(bb, arts, x[:6], lora_only), **tol(bb)
    )
    # the adapters really act: without them the LoRA rows would score like the bare backbone's head
    bare = torch.stack(
        [bank.head_w[s] @ f + bank.head_b[s] for s, f in zip(slots, bb.forward_features(x), strict=True)]
    )
    lora_rows = [i for i, s in enumerate(slots) if s < 3]
    assert not torch.allclose(
        mixed[lora_rows].nan_to_num(0, 0, 0), bare[lora_rows].nan_to_num(0, 0, 0), atol=1e-3
    )


def test_an_adapter_of_late_modules_starts_late_and_its_rows_still_match(bb: Backbone) -> None:
    """LoRA on the second half of the modules leaves the prefix frozen: training caches it and a batch
    runs it once for every row, and the first adapted module still acts."""
    targets = lora_targets(bb)
    late = _filled(
        bb, "lora", LoRAConfig(4, lora_rank=2, target_modules=tuple(targets[len(targets) // 2 :])), 9, 0.1
    )
    first = bb.weight_layer[targets[len(targets) // 2]] - 1
    assert 0 < first < bb.pooled_index
    module = load_module(late, bb)
    assert module.first_layer == first
    bank = _bank(bb, [late])
    assert bank.first_layer([0]) == first
    x = _images(bb, 4, seed=5)
    torch.testing.assert_close(
        forward_mixed(bb, bank, x, [0] * 4), _own_forward(bb, [late], x, [0] * 4), **tol(bb)
    )


def test_every_image_under_every_adapter(bb: Backbone, arts: list[PromptArtifact]) -> None:
    x = _images(bb, 3, seed=3)
    bank = _bank(bb, arts)
    multi = forward_multi(bb, bank, x, [2, 0, 4])  # [P, N, Kmax]
    for p, s in enumerate([2, 0, 4]):
        torch.testing.assert_close(multi[p], _own_forward(bb, arts, x, [s] * 3), **tol(bb))


@pytest.mark.parametrize("name", ["resnet20_cifar"])
def test_both_conv_mechanisms_agree(name: str, weights_dir: Path) -> None:
    """The grouped convolution (default) and the stacked one compute the same per-row update."""
    bb = create_backbone(_spec(name, weights_dir))
    arts = adapters(bb)[:3]
    slots = [0, 1, 2, 2, 1, 0, 0]
    x = _images(bb, len(slots))
    bank = _bank(bb, arts)
    outs = {}
    for mode in CONV_MODES:
        bank.lora.conv_mode = mode
        outs[mode] = forward_mixed(bb, bank, x, slots)
    torch.testing.assert_close(outs["stacked"], outs["grouped"], **TOL)
    torch.testing.assert_close(outs["grouped"], _own_forward(bb, arts, x, slots), **TOL)


@pytest.fixture(scope="module")
def r20(weights_dir: Path) -> Backbone:
    return create_backbone(_spec("resnet20_cifar", weights_dir))


def test_the_artifact_holds_kilobytes_of_factors_in_peft_layout(r20: Backbone) -> None:
    art = _filled(r20, "lora", LoRAConfig(10, lora_rank=4), 0, 0.05)
    targets = lora_targets(r20)
    assert art.metadata["lora_targets"] == targets
    assert (art.metadata["lora_rank"], art.metadata["lora_alpha"], art.metadata["lora_scale"]) == (4, 4, 1.0)
    modules = dict(r20.model.named_modules())
    expected = 0
    for name in targets:
        conv = modules[name]
        kh, kw = conv.kernel_size  # type: ignore[misc]
        a, b = art.tensors[lora_key(name, "A")], art.tensors[lora_key(name, "B")]
        assert tuple(a.shape) == (4, conv.in_channels, kh, kw)  # type: ignore[union-attr]
        assert tuple(b.shape) == (conv.out_channels, 4, 1, 1)  # type: ignore[union-attr]
        expected += a.numel() + b.numel()
    factors = sum(t.numel() for k, t in art.tensors.items() if k.startswith("lora."))
    assert factors == expected and 25_000 < factors < 32_000  # r=4 on ResNet-20: about 28k parameters
    assert len(art.to_bytes()) < 200_000  # kilobytes, the head included
    again = PromptArtifact.from_bytes(art.to_bytes())
    assert again.sha256 == art.sha256 and again.method_config == LoRAConfig(10, lora_rank=4)


def test_a_slot_rewritten_drops_its_factors_and_bad_factors_are_refused(r20: Backbone) -> None:
    lora, ap = adapters(r20)[0], adapters(r20)[3]
    bank = PromptBank(r20, 4, max_classes=6)
    empty = bank.nbytes
    held = bank.write(1, lora)
    assert held > 0 and bank.nbytes > empty and bank.lora.modules(1)
    x = _images(r20, 2)
    bank.write(1, ap)  # the same slot, now an AP prompt: no LoRA update may survive
    assert not bank.lora.modules(1)
    torch.testing.assert_close(forward_mixed(r20, bank, x, [1, 1]), _own_forward(r20, [ap], x, [0, 0]), **TOL)
    name = lora_targets(r20)[3]
    missing = {k: v for k, v in lora.tensors.items() if k != lora_key(name, "B")}
    with pytest.raises(ArtifactError, match="lacks tensor"):
        bank.write(2, PromptArtifact(missing, lora.metadata))
    bent = {**lora.tensors, lora_key(name, "A"): torch.zeros(2, 1, 3, 3)}
    with pytest.raises(ArtifactError, match="has shape"):
        bank.write(2, PromptArtifact(bent, lora.metadata))
    assert not bank.occupied(2)
    with pytest.raises(MethodError, match="cannot be adapted"):
        create_method("lora", r20, LoRAConfig(2, target_modules=("fc",)))
