"""The one base class every method builds on: the trainable part that rides on a frozen backbone.

A `PromptModule` never owns the backbone's weights (except `full`, the benchmark ceiling). It knows the
earliest layer where something trainable acts (`first_layer`), so training runs the prefix
`backbone.run(x, 0, first_layer)` without autograd (and can cache it), and only the rest with autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from service.engine.errors import ArtifactError, MethodError

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

LayerFn = Callable[[int, Tensor], Tensor]
NormFn = Callable[[str, Tensor], Tensor]

PROMPT_SHAPES = ("full", "channel")
INPUT_VARIANTS = ("pad", "additive")


@dataclass(frozen=True)
class MethodConfig:
    """What a method needs beyond the backbone; validated here so every caller gets the same errors.

    Attributes:
        num_classes: classes of the downstream task (the head's output width).
        prompt_layers: layer indices of the activation prompt (already resolved; several = deep AP).
        prompt_shape: "full" (the activation's shape) or "channel" (one value per channel / feature).
        input_variant: VP only: "pad" (shrink the image, learn a frame) or "additive" (full-image delta).
        pad_size: VP frame width in pixels; None = 1/8 of the shorter input side.
        lora_rank: LoRA only: rank r of every low-rank update (alpha = r, so the scale is 1).
    """

    num_classes: int
    prompt_layers: tuple[int, ...] = ()
    prompt_shape: str = "full"
    input_variant: str = "pad"
    pad_size: int | None = None
    lora_rank: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise MethodError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.prompt_shape not in PROMPT_SHAPES:
            raise MethodError(f"prompt_shape must be one of {PROMPT_SHAPES}, got {self.prompt_shape!r}")
        if self.input_variant not in INPUT_VARIANTS:
            raise MethodError(f"input_variant must be one of {INPUT_VARIANTS}, got {self.input_variant!r}")
        if self.pad_size is not None and self.pad_size < 1:
            raise MethodError(f"pad_size must be >= 1, got {self.pad_size}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise MethodError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        object.__setattr__(self, "prompt_layers", tuple(int(i) for i in self.prompt_layers))

    @classmethod
    def for_method(cls, method: str, *, num_classes: int, **options: Any) -> MethodConfig:
        """The config of `method` (the type tag): options it does not take are refused, not ignored.

        An option the method does not declare in `PromptModule.options` is accepted only at its default
        value (callers may pass every field uniformly); any other value is a MethodError naming it.
        """
        from service.engine.methods.registry import get_method_class

        allowed = get_method_class(method).options
        defaults = {f.name: f.default for f in fields(cls) if f.name != "num_classes"}
        for key, value in options.items():
            if key not in defaults:
                raise MethodError(f"unknown method option {key!r}", code="invalid_method_option", param=key)
            empty = value is None or value == () or value == []
            if key not in allowed and not empty and value != defaults[key]:
                takes = ", ".join(allowed) or "no options"
                raise MethodError(
                    f"{key} does not apply to method {method!r} (it takes {takes})",
                    code="invalid_prompt_layer" if key == "prompt_layers" else "option_not_applicable",
                    param="prompt_layer" if key == "prompt_layers" else key,
                )
        kept = {k: v for k, v in options.items() if k in allowed and v is not None}
        return cls(num_classes=num_classes, **kept)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_layers"] = list(self.prompt_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodConfig:
        return cls(
            num_classes=int(d["num_classes"]),
            prompt_layers=tuple(d.get("prompt_layers", ())),
            prompt_shape=str(d.get("prompt_shape", "full")),
            input_variant=str(d.get("input_variant", "pad")),
            pad_size=d.get("pad_size"),
            lora_rank=int(d.get("lora_rank", 4)),
        )


def norm_layer_segments(backbone: Backbone) -> dict[str, int]:
    """Map each norm module name to the layer index whose segment `run(h, i - 1, i)` executes it."""
    return {n.name: n.layer_index for n in backbone.norm_layers}


class PromptModule(nn.Module):
    """Trainable parameters of one method plus the linear head; the backbone stays outside.

    Subclasses set `first_layer` and override the hooks they need: `enter` (act on the activation at
    `first_layer` itself), `layer_fn` / `norm_fn` (passed to `Backbone.run`), and
    `_export_prompt` / `_load_prompt` (artifact tensors besides the head).
    """

    name: ClassVar[str] = ""
    #: False for methods that copy the backbone (full fine-tuning): they cannot share a serving pass.
    servable: ClassVar[bool] = True
    #: The `MethodConfig` fields this method takes besides num_classes (its "config class"); any other
    #: option given with a non-default value is refused by `MethodConfig.for_method`.
    options: ClassVar[tuple[str, ...]] = ()
    #: The layer request a job without `prompt_layer` gets (None: the backbone's recommended layer).
    default_prompt_layer: ClassVar[str | None] = None

    @classmethod
    def uses_prompt_layers(cls) -> bool:
        return "prompt_layers" in cls.options

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the backbone's weights must not appear in parameters().
        self.backbone = backbone
        self.config = config
        self.first_layer: int = 0
        self.head = nn.Linear(backbone.num_features, config.num_classes)
        self.to(backbone.device)

    # --- hooks ---------------------------------------------------------------------------------------
    @property
    def prompt_layers(self) -> tuple[int, ...]:
        """Layer indices where a prompt acts (recorded in the artifact); empty for head/norm methods."""
        return ()

    def enter(self, h: Tensor) -> Tensor:
        """Apply whatever acts on the activation at `first_layer` itself (run() only covers later ones)."""
        return h

    def layer_fn(self) -> LayerFn | None:
        return None

    def norm_fn(self) -> NormFn | None:
        return None

    def _export_prompt(self) -> dict[str, Tensor]:
        return {}

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        return None

    def metadata(self) -> dict[str, Any]:
        """Method-specific artifact metadata (JSON-able)."""
        return {"prompt_shape": self.config.prompt_shape if self.prompt_layers else None}

    # --- running -------------------------------------------------------------------------------------
    @property
    def run_backbone(self) -> Backbone:
        """The backbone the forward pass runs through (a private copy only for `full`)."""
        return self.backbone

    def prefix(self, x: Tensor) -> Tensor:
        """Activation at `first_layer` for a normalised image batch; no autograd (nothing trainable)."""
        if self.first_layer == 0:
            return x
        with torch.no_grad():
            return self.run_backbone.run(x, 0, self.first_layer)

    def forward_from(self, h: Tensor) -> Tensor:
        """Logits [B, K] from the (unprompted) activation at `first_layer`."""
        bb = self.run_backbone
        h = self.enter(h)
        if self.first_layer < bb.pooled_index:
            h = bb.run(h, self.first_layer, bb.pooled_index, layer_fn=self.layer_fn(), norm_fn=self.norm_fn())
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, K] for a normalised image batch [B, 3, H, W]."""
        return self.forward_from(self.prefix(x))

    # --- state ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def export_tensors(self) -> dict[str, Tensor]:
        """Every tensor an artifact needs (CPU, contiguous, fp32): the prompt's and the head's."""
        out = {"head.weight": self.head.weight, "head.bias": self.head.bias, **self._export_prompt()}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of `export_tensors`. Raises ArtifactError when a tensor is missing or misshapen."""
        with torch.no_grad():
            _copy_into(self.head.weight, tensors, "head.weight")
            _copy_into(self.head.bias, tensors, "head.bias")
            self._load_prompt(tensors)


def _copy_into(dst: Tensor, tensors: Mapping[str, Tensor], key: str) -> None:
    """Copy `tensors[key]` into `dst`, with a clear error instead of a shape traceback."""
    if key not in tensors:
        raise ArtifactError(f"artifact lacks tensor {key!r}")
    src = tensors[key]
    if tuple(src.shape) != tuple(dst.shape):
        got, want = tuple(src.shape), tuple(dst.shape)
        raise ArtifactError(f"artifact tensor {key!r} has shape {got}, expected {want}")
    dst.copy_(src.to(dst.device, dst.dtype))
