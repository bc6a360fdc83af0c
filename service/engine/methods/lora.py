"""LoRA (Hu et al. 2021): trained through the real `peft` library, served per row on the shared backbone.

A low-rank update `y = W x + s * B (A x)` (rank r, scale s = alpha / r, B zero-initialised) on every
ungrouped convolution of a CNN (depthwise ones excluded: peft cannot adapt them at small ranks), or on the
attention and MLP linears (qkv / proj / fc1 / fc2) of a ViT's blocks. Training: peft rewrites modules
in place, so the module trains on a private copy of the backbone (the shared one is never touched); the
copy stays in eval mode (BN statistics frozen); only the LoRA factors and the head train.

Serving does not need that copy: the factors are exported in PEFT's own layout and names, and the mixed
batch applies each row's update on the shared backbone (`service.engine.lora_rows`).

Artifact tensors (PEFT's saved names without the `base_model.model.` prefix, shapes as peft holds them):

    lora.<module>.lora_A.weight   conv [r, C_in, kh, kw] (kernel, stride, padding of the module; dilation 1)
                                  linear [r, D_in]
    lora.<module>.lora_B.weight   conv [C_out, r, 1, 1]; linear [D_out, r]

and metadata `lora_rank`, `lora_alpha`, `lora_scale` (= alpha / r) and `lora_targets` (module names).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from timm.layers import Conv2dSame
from torch import Tensor, nn

from service.engine.errors import ArtifactError, MethodError
from service.engine.methods.base import MethodConfig, PromptModule, _copy_into
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

#: ViT linears LoRA adapts: attention (qkv, proj) and MLP (fc1, fc2) inside the transformer blocks.
_VIT_TARGET = re.compile(r"(^|\.)blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$")
#: Artifact tensor names: lora.<module>.lora_A.weight / lora.<module>.lora_B.weight.
_KEY = re.compile(r"^lora\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def lora_key(module: str, factor: str) -> str:
    """Artifact tensor name of factor "A" or "B" of `module` (PEFT's saved name, unprefixed)."""
    return f"lora.{module}.lora_{factor}.weight"


def adaptable(module: nn.Module, family: str, name: str) -> bool:
    """Whether LoRA can adapt `module` here (and the per-row serving path reproduces peft on it)."""
    if family == "vit":
        return type(module) is nn.Linear and _VIT_TARGET.search(name) is not None
    # Zero-padded, ungrouped convs whose padding rule the per-row path reproduces: peft builds A as the
    # module's own type with its kernel, stride and padding (timm's Conv2dSame pads "same" on the fly).
    if not isinstance(module, nn.Conv2d) or type(module) not in (nn.Conv2d, Conv2dSame):
        return False
    return module.groups == 1 and module.padding_mode == "zeros"


def lora_targets(backbone: Backbone) -> list[str]:
    """Module names LoRA adapts: every ungrouped (plain or "same"-padded) Conv2d of a CNN, the block
    linears of a ViT."""
    names = [n for n, m in backbone.model.named_modules() if adaptable(m, backbone.family, n)]
    if not names:
        raise MethodError(f"backbone {backbone.spec.model!r} has no module LoRA can adapt")
    return names


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """Options of `lora` (named apart from peft's own `LoraConfig`, which the module builds from it).

    Attributes:
        lora_rank: rank r of every low-rank update.
        lora_alpha: alpha; the update is scaled by alpha / r (None: alpha = r, a scale of 1).
        target_modules: names of the modules to adapt (None: every module LoRA can adapt).
    """

    method: ClassVar[str] = "lora"
    lora_rank: int = 4
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 1:
            raise MethodError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha is not None and (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, int | float)
            or self.lora_alpha <= 0
        ):
            raise MethodError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(
                isinstance(t, str) for t in self.target_modules
            ):
                raise MethodError("target_modules must be a list of module names")
            if not self.target_modules:
                raise MethodError("target_modules must name at least one module")
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        """alpha / r: the factor of every update."""
        return (self.lora_rank if self.lora_alpha is None else float(self.lora_alpha)) / self.lora_rank


def lora_first_layer(backbone: Backbone, targets: list[str]) -> int:
    """The last layer before any adapted module runs: the prefix up to it is the frozen backbone's own,
    so training caches it and a mixed batch runs it once for every row."""
    return max(0, min(backbone.weight_layer.get(t, backbone.pooled_index) for t in targets) - 1)


def resolve_targets(backbone: Backbone, config: LoRAConfig) -> list[str]:
    """The modules `config` adapts on `backbone`, in model order; MethodError names one it cannot."""
    every = lora_targets(backbone)
    if config.target_modules is None:
        return every
    allowed = set(every)
    for name in config.target_modules:
        if name not in allowed:
            raise MethodError(
                f"module {name!r} of backbone {backbone.spec.model!r} cannot be adapted by LoRA "
                f"(adaptable: the plain ungrouped convolutions, or a ViT block's qkv/proj/fc1/fc2)",
                param="target_modules",
            )
    wanted = set(config.target_modules)
    return [n for n in every if n in wanted]


def lora_factors(
    backbone: Backbone, config: LoRAConfig, tensors: Mapping[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (A, B) from artifact tensors, each checked against the module's shape.

    This is what serving reads: no copy of the backbone is built. Raises ArtifactError when a factor is
    missing, misshapen, or names a module the config does not adapt.
    """
    targets = resolve_targets(backbone, config)
    modules = dict(backbone.model.named_modules())
    r = config.lora_rank
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name in targets:
        m = modules[name]
        want_a: tuple[int, ...]
        want_b: tuple[int, ...]
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            want_a, want_b = (r, m.in_channels, kh, kw), (m.out_channels, r, 1, 1)
        elif isinstance(m, nn.Linear):
            want_a, want_b = (r, m.in_features), (m.out_features, r)
        else:
            raise ArtifactError(f"LoRA target {name!r} is a {type(m).__name__}, not a Conv2d or Linear")
        pair = []
        for factor, want in (("A", want_a), ("B", want_b)):
            key = lora_key(name, factor)
            t = tensors.get(key)
            if t is None:
                raise ArtifactError(f"artifact lacks tensor {key!r}")
            if tuple(t.shape) != want:
                raise ArtifactError(f"artifact tensor {key!r} has shape {tuple(t.shape)}, expected {want}")
            pair.append(t)
        out[name] = (pair[0], pair[1])
    extra = sorted(
        k for k in tensors if k.startswith("lora.") and (m := _KEY.match(k)) and m["module"] not in out
    )
    if extra:
        raise ArtifactError(f"artifact tensor {extra[0]!r} adapts a module outside the adapter's targets")
    return out


@register_method("lora")
class LoRA(PromptModule):
    """peft LoRA adapters (rank r, alpha) on a private copy of the backbone for training, plus the head."""

    config_class: ClassVar[type[MethodConfig]] = LoRAConfig
    config: LoRAConfig

    def __init__(self, backbone: Backbone, config: LoRAConfig) -> None:
        super().__init__(backbone, config)
        from peft import LoraConfig, inject_adapter_in_model

        from service.engine.backbones import Backbone as _Backbone

        self.targets = resolve_targets(backbone, config)
        model = copy.deepcopy(backbone.model)
        rank = config.lora_rank
        alpha = rank if config.lora_alpha is None else config.lora_alpha
        # One anchored regex (peft full-matches a string): a list would also match by ".name" suffix, so
        # a target "conv1" (the stem) would adapt every block's "layerN.M.conv1" as well.
        pattern = "|".join(re.escape(t) for t in self.targets)
        # peft types alpha as int but only divides by it: a fractional alpha (an imported adapter's) works
        lora_cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=pattern)  # type: ignore[arg-type]
        model = inject_adapter_in_model(lora_cfg, model)
        model.to(backbone.device)
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        self._copy = _Backbone(backbone.spec, model, backbone.device)
        self.model = model  # registered: its LoRA factors are this module's trainable parameters
        self.first_layer = lora_first_layer(backbone, self.targets)

    @property
    def run_backbone(self) -> Backbone:
        return self._copy

    def train(self, mode: bool = True) -> LoRA:
        """Train the head and adapters, but keep the copied backbone in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.model.eval()
        return self

    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        alpha = cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha
        return {
            "prompt_shape": None,
            "lora_rank": cfg.lora_rank,
            "lora_alpha": alpha,
            "lora_scale": cfg.scale,
            "lora_targets": self.targets,
        }

    def _lora_tensors(self) -> dict[str, nn.Parameter]:
        """Artifact name -> peft's parameter (peft's in-memory name has the adapter name "default")."""
        out: dict[str, nn.Parameter] = {}
        for k, p in self.model.named_parameters():
            if "lora_" in k:
                module, factor = k.split(".lora_", 1)
                out[lora_key(module, factor[0])] = p  # "A.default.weight" -> lora_A.weight
        return out

    def _export_prompt(self) -> dict[str, Tensor]:
        return dict(self._lora_tensors())

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        for key, p in self._lora_tensors().items():
            _copy_into(p, tensors, key)
