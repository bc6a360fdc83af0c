"""What every peer server serves: the same ResNet-20, the same prompts, the same preprocessing and JSON.

A peer reads its prompts from a folder of artifact files (``BENCH_PROMPTS``: ``p0.safetensors`` ...,
the very bytes actprompt imports through its API) and the backbone weights from ``BENCH_WEIGHTS``.
A request body is ``{"images": [base64 PNG, ...], "top_k": 3, "prompt": "p17"}`` (``prompt`` optional:
the first prompt) and the answer ``{"predictions": [[{"label", "index", "probability"}, ...], ...]}``,
as actprompt's. Only the engine library is imported (torch, timm, PIL): peers run in their own venv.

Two ways to score a batch whose rows name different prompts, as a framework's user would write them:

- ``forward_per_prompt``: one forward pass per distinct prompt (each prompt is a model);
- ``forward_gather``: one pass for every row, the deltas and heads gathered per row by hand.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.engine import BackboneSpec, create_backbone, decode_image
from service.engine.artifacts import PromptArtifact, load_module
from service.engine.methods.activation import delta_key

Predictions = list[list[dict[str, Any]]]


class PromptedModel:
    """The backbone, every prompt as its own module (per-prompt path) and as stacked tensors (gather)."""

    def __init__(self, weights: str, prompts_dir: Path) -> None:
        torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
        self.backbone = create_backbone(BackboneSpec("resnet20_cifar", weights=weights), "cpu")
        files = sorted(prompts_dir.glob("p*.safetensors"), key=lambda p: int(p.stem[1:]))
        if not files:
            raise FileNotFoundError(f"no p<N>.safetensors in {prompts_dir}")
        self.artifacts = {p.stem: PromptArtifact.from_bytes(p.read_bytes()) for p in files}
        self.default = files[0].stem
        # the image pipeline the prompts were made with (one backbone: the same for every prompt)
        self.preprocessing = self.artifacts[self.default].preprocessing(self.backbone)
        self.modules: dict[str, torch.nn.Module] = {}  # built on a prompt's first request (a model cache)
        self.index = {k: i for i, k in enumerate(self.artifacts)}
        layers = {a.prompt_layers for a in self.artifacts.values()}
        if len(layers) != 1 or len(next(iter(layers))) != 1:
            raise ValueError(f"the gather path needs every prompt at one layer, got {layers}")
        self.layer = next(iter(layers))[0]
        arts = list(self.artifacts.values())
        self.deltas = torch.stack([a.tensors[delta_key(self.layer)] for a in arts])  # [P, *shape]
        self.head_w = torch.stack([a.tensors["head.weight"] for a in arts])  # [P, K, D]
        self.head_b = torch.stack([a.tensors["head.bias"] for a in arts])  # [P, K]

    def prompt_of(self, body: dict[str, Any]) -> str:
        name = body.get("prompt") or self.default
        if name not in self.artifacts:
            raise KeyError(f"unknown prompt {name!r}")
        return str(name)

    def decode(self, images_b64: Sequence[str]) -> Tensor:
        """Base64 PNGs -> normalised [N, 3, H, W] (the engine's decoding and preprocessing)."""
        return self.preprocessing([decode_image(base64.b64decode(s)) for s in images_b64])

    def forward_one(self, prompt: str, x: Tensor) -> Tensor:
        """Probabilities [N, K] of one prompt's module."""
        module = self.modules.get(prompt)
        if module is None:
            module = self.modules[prompt] = load_module(self.artifacts[prompt], self.backbone).eval()
        with torch.inference_mode():
            return torch.softmax(module(x), dim=-1)

    def forward_per_prompt(self, prompts: Sequence[str], x: Tensor) -> list[Tensor]:
        """Row i under prompts[i]: one forward per distinct prompt; per-row probabilities [K]."""
        out: list[Tensor | None] = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        for p, rows in groups.items():
            probs = self.forward_one(p, x[rows])
            for j, i in enumerate(rows):
                out[i] = probs[j]
        return [t for t in out if t is not None]

    def forward_gather(self, prompts: Sequence[str], x: Tensor) -> Tensor:
        """Row i under prompts[i] in one pass: h[i] += delta[p_i] at the layer, logits = W[p_i] f[i] + b."""
        idx = torch.tensor([self.index[p] for p in prompts])  # [B]
        bb = self.backbone
        with torch.inference_mode():
            h = bb.run(x, 0, self.layer) + self.deltas.index_select(0, idx)  # [B, *shape]
            f = bb.run(h, self.layer, bb.pooled_index)  # [B, D]
            logits = torch.baddbmm(
                self.head_b.index_select(0, idx).unsqueeze(2),
                self.head_w.index_select(0, idx),
                f.unsqueeze(2),
            ).squeeze(2)  # [B, K]
            return torch.softmax(logits, dim=-1)

    def score_items(self, items: Sequence[tuple[str, Tensor, int]], gather: bool) -> list[Predictions]:
        """One server batch of (prompt, images [N, 3, H, W], top_k) requests -> each request's predictions:
        the rows concatenated, scored one pass per prompt (or gathered per row), split back per request."""
        x = torch.cat([x for _, x, _ in items])  # [sum N, 3, H, W]
        prompts = [p for p, xi, _ in items for _ in range(xi.shape[0])]
        rows = list(self.forward_gather(prompts, x)) if gather else self.forward_per_prompt(prompts, x)
        out, start = [], 0
        for p, xi, k in items:
            n = xi.shape[0]
            out.append(self.shape(p, torch.stack(rows[start : start + n]), k))
            start += n
        return out

    def shape(self, prompt: str, probs: Tensor, top_k: int) -> Predictions:
        """Probabilities [N, K] -> the JSON predictions of one request."""
        classes = self.artifacts[prompt].classes
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [
            [{"label": classes[j], "index": j, "probability": p} for p, j in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
        ]


def from_env() -> PromptedModel:
    return PromptedModel(os.environ["BENCH_WEIGHTS"], Path(os.environ["BENCH_PROMPTS"]))


def mode() -> str:
    """``per_prompt`` (each prompt a model: the users' way) or ``gather`` (per-row gather by hand)."""
    value = os.environ.get("BENCH_MODE", "per_prompt")
    if value not in ("per_prompt", "gather"):
        raise ValueError(f"BENCH_MODE must be per_prompt or gather, got {value!r}")
    return value
