"""Visual prompting (VP, Bahng et al. 2022), the input-space baseline: a prompt at layer 0.

"pad": the image is shrunk by `pad_size` pixels on each side and a learnable frame of pixels fills
the border (the padding prompt of the VP literature). "additive": a full-image learnable delta.
Gradients flow through the whole backbone, which is why VP trains slower than a deep AP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.engine.errors import MethodError
from service.engine.methods.base import MethodConfig, PromptModule, _copy_into
from service.engine.methods.registry import register_method

if TYPE_CHECKING:
    from service.engine.backbones import Backbone

INPUT_VARIANTS = ("pad", "additive")

#: Artifact tensor name of the input prompt [3, H, W]: the frame (zero inside) or the additive delta.
INPUT_KEY = "input.prompt"


def default_pad_size(input_size: tuple[int, int]) -> int:
    """1/8 of the shorter input side (4 px at 32x32, 28 px at 224x224)."""
    return max(1, min(input_size) // 8)


def frame_mask(input_size: tuple[int, int], pad: int, device: torch.device | None = None) -> Tensor:
    """[1, H, W] float mask: 1 on the frame (the outer `pad` pixels), 0 on the shrunk image."""
    h, w = input_size
    mask = torch.ones(1, h, w, device=device)
    mask[:, pad : h - pad, pad : w - pad] = 0.0
    return mask


def shrink_scale(input_size: tuple[int, int], pad: int) -> tuple[float, float]:
    """(sx, sy) of the affine map output -> input coordinates that shrinks the image into the interior."""
    h, w = input_size
    return (w / (w - 2 * pad), h / (h - 2 * pad))


def shrink_images(x: Tensor, scale: Tensor) -> Tensor:
    """Shrink each image of x [B, 3, H, W] into its central region, row i by scale[i] [B, 2] = (sx, sy).

    One batched `grid_sample` (bilinear, border-clamped, like `interpolate`), so rows with different
    frame widths share one call in the serving path; the area outside the interior is garbage and is
    masked away by the caller.
    """
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)  # [B, 2, 3]
    theta[:, 0, 0] = scale[:, 0]
    theta[:, 1, 1] = scale[:, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class InputPromptConfig(MethodConfig):
    """Options of `input` (VP).

    Attributes:
        input_variant: "pad" (shrink the image, learn a frame) or "additive" (full-image delta).
        pad_size: frame width in pixels; None = 1/8 of the shorter input side.
    """

    method: ClassVar[str] = "input"
    input_variant: str = "pad"
    pad_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_variant not in INPUT_VARIANTS:
            raise MethodError(f"input_variant must be one of {INPUT_VARIANTS}, got {self.input_variant!r}")
        if self.pad_size is not None and self.pad_size < 1:
            raise MethodError(f"pad_size must be >= 1, got {self.pad_size}")


@register_method("input")
class InputPrompt(PromptModule):
    """x <- shrink(x) * (1 - mask) + frame * mask ("pad"), or x <- x + delta ("additive")."""

    config_class: ClassVar[type[MethodConfig]] = InputPromptConfig
    config: InputPromptConfig

    def __init__(self, backbone: Backbone, config: InputPromptConfig) -> None:
        super().__init__(backbone, config)
        size = backbone.spec.input_size
        assert size is not None  # a resolved spec always has one
        self.input_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.variant = config.input_variant
        self.pad_size = config.pad_size or default_pad_size(self.input_size)
        if self.variant == "pad" and 2 * self.pad_size >= min(self.input_size):
            raise MethodError(f"pad_size {self.pad_size} leaves no image inside a {self.input_size} input")
        self.prompt = nn.Parameter(torch.zeros(3, *self.input_size, device=backbone.device))
        self.mask: Tensor
        self.register_buffer("mask", frame_mask(self.input_size, self.pad_size, backbone.device))
        self.first_layer = 0

    @property
    def prompt_layers(self) -> tuple[int, ...]:
        return (0,)

    def enter(self, h: Tensor) -> Tensor:
        if self.variant == "additive":
            return h + self.prompt
        sx, sy = shrink_scale(self.input_size, self.pad_size)
        scale = h.new_tensor([sx, sy]).expand(h.shape[0], 2)
        mask = self.mask
        return shrink_images(h, scale) * (1.0 - mask) + self.prompt * mask

    def metadata(self) -> dict[str, Any]:
        return {
            "prompt_shape": "full",
            "input_variant": self.variant,
            "pad_size": self.pad_size if self.variant == "pad" else None,
        }

    def _export_prompt(self) -> dict[str, Tensor]:
        mask = self.mask
        return {INPUT_KEY: self.prompt * mask if self.variant == "pad" else self.prompt}

    def _load_prompt(self, tensors: Mapping[str, Tensor]) -> None:
        _copy_into(self.prompt, tensors, INPUT_KEY)
