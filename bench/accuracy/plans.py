"""The accuracy benchmark's plans: backbones, method variants, learning-rate ladders and budgets (scopes).

Data only: what to run and at which budget. `protocol` decides which runs a plan needs, `runs` trains
one of them, `driver` executes a plan and collects the payload, `plots` draws the layer sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.common import WEIGHTS_DIR

#: Backbones with real weights: spec kwargs for `BackboneSpec`.
BACKBONES: dict[str, dict[str, Any]] = {
    "resnet20_cifar": {"model": "resnet20_cifar", "weights": (WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri()},
    "resnet56_cifar": {"model": "resnet56_cifar", "weights": (WEIGHTS_DIR / "resnet56-4bfd9763.th").as_uri()},
    "vit_cifar10_p4_d128_l6": {
        "model": "vit_cifar10_p4_d128_l6",
        "weights": (WEIGHTS_DIR / "vit_cifar10_p4_d128_l6.safetensors").as_uri(),
    },
    # ImageNet MobileNetV2 (dequantised TFLite): TF "same" padding and its own mean/std (weights README).
    "mobilenetv2_100": {
        "model": "mobilenetv2_100",
        "weights": (WEIGHTS_DIR / "mobilenetv2_100_tflite_dequant.safetensors").as_uri(),
        "model_kwargs": {"pad_type": "same", "num_classes": 1001},
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    },
}

#: Method variants: the engine method and its config. `method` is the published row's method name.
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear"},
    "vp_pad": {"method": "input", "input_variant": "pad"},
    "vp_additive": {"method": "input", "input_variant": "additive"},
    "norm": {"method": "norm"},
    "lora_r4": {"method": "lora", "lora_rank": 4},
    "lora_r16": {"method": "lora", "lora_rank": 16},
    "full": {"method": "full"},
    "ap": {"method": "activation", "prompt_shape": "full"},
    "ap_channel": {"method": "activation", "prompt_shape": "channel"},
    "deep_ap": {"method": "deep_activation"},
    "deep_ap_norm": {"method": "deep_activation_norm"},
}
VARIANT_LABELS = {
    "linear": "linear probe",
    "vp_pad": "VP, padding",
    "vp_additive": "VP, additive",
    "norm": "norm-tune",
    "lora_r4": "LoRA r=4 (peft)",
    "lora_r16": "LoRA r=16 (peft)",
    "full": "full fine-tuning",
    "ap": "AP, one layer (val-chosen)",
    "ap_channel": "AP, channel shape (same layer)",
    "deep_ap": "deep AP (every block)",
    "deep_ap_norm": "deep AP + norm-tune",
}
ALL_VARIANTS = tuple(VARIANTS)
#: The log ladder every grid lives on (half decades), and each variant's starting point on it.
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
CENTRE = {
    "linear": 3e-2,
    "vp_pad": 1e-2,
    "vp_additive": 1e-2,
    "norm": 1e-2,
    "lora_r4": 3e-3,
    "lora_r16": 3e-3,
    "full": 1e-3,
    "ap": 1e-2,
    "ap_channel": 1e-2,
    "deep_ap": 1e-2,
    "deep_ap_norm": 1e-2,
}
MAX_EXTENSIONS = 2  # grid points added beyond the initial grid, one per round, while the best is at an edge
SERVABLE = {
    "linear",
    "vp_pad",
    "vp_additive",
    "norm",
    "ap",
    "ap_channel",
    "deep_ap",
    "deep_ap_norm",
    "lora_r4",
    "lora_r16",
}


@dataclass(frozen=True)
class Scope:
    """One (backbone, dataset) cell and the budget every method in it gets (same images, epochs, seeds)."""

    backbone: str
    dataset: str
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    batch_size: int
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = ALL_VARIANTS
    grid_points: int = 3  # initial learning-rate grid size (then extended at an edge)
    sweep_stride: int = 1  # AP layer sweep: every layer (1) or every k-th plus the ends and recommended
    max_extensions: int = MAX_EXTENSIONS  # grid points added while the best sits at an edge
    #: Another (earlier) scope of the same backbone whose validation-chosen learning rate and AP layer
    #: this scope reuses instead of tuning its own: a larger budget checked at the small budget's choice.
    settings_from: str | None = None
    tag: str = ""  # tells apart two scopes of one (backbone, dataset), e.g. "reference"
    #: (variant, rate) pairs that move a variant's grid start away from `CENTRE` in this scope: a prior
    #: on where its grid begins, not a choice (the grid still extends on validation while at an edge).
    lr_centres: tuple[tuple[str, float], ...] = ()

    def centre(self, variant: str) -> float:
        return dict(self.lr_centres).get(variant, CENTRE[variant])

    @property
    def cell(self) -> str:
        """`backbone/dataset`: the (backbone, dataset) cell that tables and merges group by."""
        return f"{self.backbone}/{self.dataset}"

    @property
    def name(self) -> str:
        return self.cell + (f"@{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class Plan:
    name: str
    scopes: tuple[Scope, ...]
    note: str = ""
    optimizer: str = "AdamW (weight decay 0), cosine decay to 0, no warm-up, no augmentation"
    max_minutes: float | None = None  # accuracy: stop starting runs after this (a rerun resumes)
    extra: dict[str, Any] = field(default_factory=dict)


#: The methods the external reference run (bench/GOALS.md) reports on ResNet-20 -> GTSRB (LoRA at r=4,
#: the one it ranks).
REFERENCE_VARIANTS = ("linear", "vp_additive", "norm", "lora_r4", "full", "ap", "deep_ap", "deep_ap_norm")


#: The CIFAR ViT's reference-budget rows: the most accurate small adapter against the servable AP family.
VIT_REFERENCE_VARIANTS = ("lora_r4", "deep_ap_norm", "deep_ap", "ap")

#: Where the ImageNet MobileNetV2's grids start for the methods that move its pretrained weights or norm
#: affines: lower than on the 32-px backbones. At the 32-px backbones' starting rates they wrecked the
#: ImageNet features in 27 steps (full fine-tuning fell to 5.6 %, below the linear probe).
MOBILENET_LR_CENTRES = (("full", 1e-4), ("norm", 1e-3), ("deep_ap_norm", 1e-3))


def _r20(dataset: str, **kw: Any) -> Scope:
    return Scope("resnet20_cifar", dataset, **kw)


#: `make bench` on the shared 2-core machine (~65 min of accuracy with two workers, ~110 min for the whole
#: `make bench`): every 32-px (backbone, dataset) cell gets rows at a small stated budget. ResNet-20 on
#: GTSRB first (3 seeds), then the same at the reference run's budget (one seed, at the small budget's
#: choices), the CIFAR ViT small and at the reference budget, then the cheaper 32-px cells. The 224-px
#: MobileNetV2 (~24 min of two workers at 6 images per class) is in the full budget only: with it the
#: whole `make bench` ran past two hours.
DEFAULT = Plan(
    name="default",
    note="sized for ~65 min of a quiet 2-core CPU (accuracy stops starting runs after 75 min; "
    "a rerun at the same commit resumes); `make bench BUDGET=full` is the full budget",
    max_minutes=75.0,
    scopes=(  # in priority order: what a cut run must have first
        _r20(
            "gtsrb",
            n_train=2000,
            n_val=500,
            n_test=2000,
            epochs=3,
            batch_size=64,
            seeds=(0, 1, 2),
            grid_points=2,
        ),
        # The reference setting (8,000 / 4,000 images, 10 epochs, batch 128), one seed, for the methods
        # the reference reports: each at the learning rate and AP layer that the scope above chose on
        # validation (tuning at this size does not fit the budget; three seeds took ~43 min of two workers).
        _r20(
            "gtsrb",
            n_train=8000,
            n_val=1000,
            n_test=4000,
            epochs=10,
            batch_size=128,
            variants=REFERENCE_VARIANTS,
            settings_from="resnet20_cifar/gtsrb",
            tag="reference",
        ),
        Scope("vit_cifar10_p4_d128_l6", "gtsrb", 800, 200, 1000, 3, 64, grid_points=2),
        # The CIFAR ViT at the reference budget (8,000 / 4,000 images, 10 epochs, batch 128, one seed, ~18
        # min of two workers): LoRA against the servable AP family, each at the rate (and AP layer) that
        # the small ViT scope chose on validation.
        Scope(
            "vit_cifar10_p4_d128_l6",
            "gtsrb",
            8000,
            1000,
            4000,
            10,
            128,
            variants=VIT_REFERENCE_VARIANTS,
            settings_from="vit_cifar10_p4_d128_l6/gtsrb",
            tag="reference",
        ),
        _r20("mnist", n_train=600, n_val=200, n_test=1000, epochs=3, batch_size=64, grid_points=2),
        # Tiny-ImageNet's first 20 classes (30 training images each): at 200 classes and 3 images each
        # every method sat at chance (0.3-2.4 %), which ranks nothing.
        _r20("tinyimagenet20", n_train=600, n_val=200, n_test=500, epochs=5, batch_size=64, grid_points=2),
        Scope("resnet56_cifar", "gtsrb", 500, 200, 800, 3, 64, grid_points=2, sweep_stride=6),
    ),
)
#: The full budget: full training sets, 10 epochs, batch 128, 3 seeds on ResNet-20, every dataset
#: on the 32-px backbones; MobileNetV2 at a stated smaller budget (224-px inputs on a CPU).
FULL = Plan(
    name="full",
    note="the full budget: tens of CPU-hours (see REPORT.md for the estimate)",
    scopes=(
        *(
            _r20(ds, n_train=8000, n_val=1000, n_test=nt, epochs=10, batch_size=128, seeds=(0, 1, 2))
            for ds, nt in (("gtsrb", 4000), ("mnist", 2000), ("tinyimagenet", 5000))
        ),
        *(
            Scope(bb, ds, 8000, 1000, nt, 10, 128, sweep_stride=stride)
            for bb, stride in (("vit_cifar10_p4_d128_l6", 1), ("resnet56_cifar", 2))
            for ds, nt in (("gtsrb", 4000), ("mnist", 2000), ("tinyimagenet", 5000))
        ),
        Scope(
            "mobilenetv2_100",
            "gtsrb",
            2000,
            500,
            2000,
            5,
            32,
            grid_points=2,
            sweep_stride=2,
            lr_centres=MOBILENET_LR_CENTRES,
        ),
    ),
)
#: `make bench-quick`: every code path (every variant, a grid extension, a sweep, two backbones incl.
#: the 224-px one) at a budget that proves the plumbing, not the methods.
QUICK = Plan(
    name="quick",
    note="plumbing check only: the numbers mean nothing",
    scopes=(
        _r20(
            "gtsrb",
            n_train=128,
            n_val=96,
            n_test=128,
            epochs=1,
            batch_size=64,
            seeds=(0, 1),
            grid_points=2,
            sweep_stride=4,
            max_extensions=1,
        ),
        _r20(  # the reference-budget path: a larger budget at the scope above's choices
            "gtsrb",
            n_train=192,
            n_val=96,
            n_test=128,
            epochs=1,
            batch_size=64,
            variants=("linear", "ap", "lora_r4", "deep_ap_norm"),
            settings_from="resnet20_cifar/gtsrb",
            tag="reference",
        ),
        Scope(
            "mobilenetv2_100",
            "gtsrb",
            32,
            16,
            32,
            1,
            16,
            variants=("linear", "ap", "lora_r4", "deep_ap_norm"),
            grid_points=1,
            sweep_stride=20,
            lr_centres=MOBILENET_LR_CENTRES,
        ),
    ),
)
PLANS = {p.name: p for p in (QUICK, DEFAULT, FULL)}
