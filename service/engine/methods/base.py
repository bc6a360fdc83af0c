"""The one base class every method builds on: the trainable part that rides on a frozen backbone.

A `PromptModule` never owns the backbone's weights (except `full`, the benchmark ceiling). It knows the
earliest layer where something trainable acts (`first_layer`), so training runs the prefix
`backbone.run(x, 0, first_layer)` without autograd (and can cache it), and only the rest with autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from service.engine.errors import ArtifactError, MethodError

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

LayerFn = Callable[[int, Tensor], Tensor]
NormFn = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class MethodConfig:
    """Base of the per-method configs (PEFT style): one frozen dataclass per method, tagged by `method`.

    A method's config class holds only the options that method takes, so an option that does not apply
    cannot even be expressed (`LinearConfig(prompt_layers=...)` is a TypeError) and `for_method` refuses
    it with an API error. Each subclass validates its own fields, so every caller gets the same errors.

    Attributes:
        method: the type tag (the registered method name); `to_dict` records it, `from_dict` dispatches on it.
        num_classes: classes of the downstream task (the head's output width).
    """

    method: ClassVar[str] = ""
    num_classes: int

    def __post_init__(self) -> None:
        if not self.method:
            raise MethodError("MethodConfig is the base class; use a method's config class or for_method")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise MethodError(f"num_classes must be a positive integer, got {self.num_classes!r}")

    @property
    def prompt_layers(self) -> tuple[int, ...]:
        """Layer indices of the prompt; () for methods without prompt layers (no such field in them)."""
        return ()

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The fields this config class takes besides num_classes (the method's own options)."""
        return tuple(f.name for f in fields(cls) if f.init and f.name != "num_classes")

    @classmethod
    def for_method(cls, method: str, *, num_classes: int, **options: Any) -> MethodConfig:
        """The config of `method` (the type tag): options it does not take are refused, not ignored.

        An option of another method is accepted only empty or at its default value, and then dropped:
        the API, the CLI and the job runner pass `prompt_shape` uniformly (the request's default "full"
        cannot be told from an explicit one). Any other value is a MethodError naming the option.
        """
        from service.engine.methods.registry import get_config_class

        config_cls = get_config_class(method)
        own = config_cls.options()
        defaults = _option_defaults()
        for key, value in options.items():
            if key in own:
                continue
            if key not in defaults:
                raise MethodError(f"unknown method option {key!r}", code="invalid_method_option", param=key)
            empty = value is None or value == () or value == []
            if not empty and value != defaults[key]:
                takes = ", ".join(own) or "no options"
                raise MethodError(
                    f"{key} does not apply to method {method!r} (it takes {takes})",
                    code="invalid_prompt_layer" if key == "prompt_layers" else "option_not_applicable",
                    param="prompt_layer" if key == "prompt_layers" else key,
                )
        kept = {k: v for k, v in options.items() if k in own and v is not None}
        return config_cls(num_classes=num_classes, **kept)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with the type tag: {"method": ..., "num_classes": ..., <the method's options>}."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"method": self.method, **{k: _jsonable(v) for k, v in values.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], method: str | None = None) -> MethodConfig:
        """Inverse of `to_dict`, dispatching on the tag to the method's config class.

        Args:
            method: the method the dict belongs to (an artifact's or checkpoint's own `method`); needed
                for dicts written before the tag existed, which carry every option of every method
                (those the method does not take, at their defaults, are dropped). A tag that differs
                from it is an error.
        """
        from service.engine.methods.registry import get_config_class

        tag = d.get("method", method)
        if not isinstance(tag, str):
            raise MethodError("method config has no method tag and no method was given")
        if method is not None and tag != method:
            raise MethodError(f"method config is tagged {tag!r}, expected {method!r}")
        config_cls = get_config_class(tag)
        if cls is not MethodConfig and not issubclass(config_cls, cls):
            raise MethodError(f"method config is tagged {tag!r}, not a {cls.__name__}")
        names = ("num_classes", *config_cls.options())
        values = {k: v for k, v in d.items() if k != "method"}
        if "method" in d:
            unknown = sorted(set(values) - set(names))
            if unknown:
                raise MethodError(
                    f"method {tag!r} takes no option {unknown[0]!r}",
                    code="invalid_method_option",
                    param=unknown[0],
                )
        else:  # written before the tag: the one config class held every option of every method
            values = {k: v for k, v in values.items() if k in names}
        if "num_classes" not in values:
            raise MethodError("method config lacks num_classes")
        return config_cls(**values)


def _jsonable(value: Any) -> Any:
    """Tuples (prompt layers) as lists, so a dict read back from JSON compares equal."""
    return list(value) if isinstance(value, tuple) else value


def _option_defaults() -> dict[str, Any]:
    """Every option of every registered method -> its default (the leniency of `for_method`)."""
    from service.engine.methods.registry import config_classes

    out: dict[str, Any] = {}
    for config_cls in config_classes():
        for f in fields(config_cls):
            if f.init and f.name != "num_classes":
                out.setdefault(f.name, f.default)
    return out


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
    #: The method's own `MethodConfig` subclass, tagged with the method's name (checked at registration,
    #: so a method without its own config class cannot be registered).
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: The layer request a job without `prompt_layer` gets (None: the backbone's recommended layer).
    default_prompt_layer: ClassVar[str | None] = None

    @classmethod
    def uses_prompt_layers(cls) -> bool:
        return "prompt_layers" in cls.config_class.options()

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class) or config.method != self.name:
            want, got = self.config_class.__name__, type(config).__name__
            raise MethodError(f"method {self.name!r} takes a {want}, got a {got}")
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
        return {"prompt_shape": None}

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
