"""`prompt_layer: auto`: a short, budgeted probe over candidate layers with the family's prior.

Candidates span the depth; the family prior (CNN: a late block, ViT: an early one) adds its default
and breaks ties. A few epochs of AP on a subsample decide among them, and the sweep rows go into the
job's events so a user sees why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from service.engine.methods import ActivationConfig
from service.engine.train import TrainConfig, fit

if TYPE_CHECKING:
    from service.engine.backbones import Backbone


@dataclass(frozen=True)
class SearchBudget:
    """How much a search may cost: candidates x epochs x (max_train rows)."""

    max_candidates: int = 4
    max_train: int = 1024
    max_val: int = 512
    epochs: int = 2
    batch_size: int = 128
    learning_rate: float = 1e-2
    prompt_shape: str = "full"
    seed: int = 0


def candidate_layers(backbone: Backbone, max_candidates: int) -> list[int]:
    """`max_candidates` layers evenly spaced from the stem to the last block, plus the recommended one.

    The family prior adds its default layer and breaks ties (see `auto_select_layer`) rather than
    excluding half the network: measured sweeps (bench/results/REPORT.md) put ResNet-20's best layer
    in its middle stage and the CIFAR ViT's at the patch embedding, which a search confined to the
    "preferred half" (CNN deep, ViT shallow) never tried.
    """
    prompts = [layer.index for layer in backbone.layers if layer.kind in ("stem", "block")]
    if not prompts:
        return [backbone.recommended_layer]
    k = max(1, min(max_candidates, len(prompts)))
    picks = {prompts[round(j * (len(prompts) - 1) / max(1, k - 1))] for j in range(k)}
    picks.add(backbone.recommended_layer)
    return sorted(picks)


def _subsample(data: tuple[Tensor, Tensor], limit: int, seed: int) -> tuple[Tensor, Tensor]:
    x, y = data
    if len(x) <= limit:
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
    return x[idx], y[idx]


def auto_select_layer(
    backbone: Backbone,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None,
    *,
    budget: SearchBudget | None = None,
    num_classes: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Probe candidate layers with short AP runs; return (best layer index, sweep rows).

    Rows: {index, name, val_accuracy, train_seconds, prompt_params}. Ties go to the layer nearest the
    family's recommended one. Without `val`, a held-out quarter of the (subsampled) train set scores.
    """
    b = budget or SearchBudget()
    k = num_classes if num_classes is not None else int(train[1].max()) + 1
    x, y = _subsample(train, b.max_train + (0 if val is not None else b.max_val), b.seed)
    if val is None:
        n_val = max(1, min(b.max_val, len(x) // 4))
        val, x, y = (x[:n_val], y[:n_val]), x[n_val:], y[n_val:]
    val = _subsample(val, b.max_val, b.seed + 1)
    classes: Sequence[str] = [str(c) for c in range(k)]
    cfg = TrainConfig(
        epochs=b.epochs,
        batch_size=b.batch_size,
        learning_rate=b.learning_rate,
        seed=b.seed,
        feature_cache_bytes=256 << 20,
    )
    rows: list[dict[str, Any]] = []
    for index in candidate_layers(backbone, b.max_candidates):
        mcfg = ActivationConfig(num_classes=k, prompt_layers=(index,), prompt_shape=b.prompt_shape)
        result = fit(backbone, "activation", mcfg, (x, y), None, val, cfg, classes=classes)
        row = {
            "index": index,
            "name": backbone.layers[index].name,
            "val_accuracy": result.metrics["test"]["top1"],
            "train_seconds": round(float(result.metrics["train_seconds"]), 3),
            "prompt_params": result.metrics["trainable_params"] - (backbone.num_features + 1) * k,
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    prior = backbone.recommended_layer
    best = max(rows, key=lambda r: (r["val_accuracy"], -abs(r["index"] - prior)))
    return int(best["index"]), rows
