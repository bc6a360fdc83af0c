"""One accuracy run, in a worker process: the product's pipeline on a scope's fixed subsets, cached."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bench.accuracy.plans import BACKBONES, VARIANTS, Scope
from bench.common import PeakMemory, dataset_path
from bench.provenance import RowCache, now, row_code

# --- one run (in a worker process) ----------------------------------------------------------------

_BACKBONES: dict[str, Any] = {}
_DATA: dict[tuple[Any, ...], Any] = {}


def _backbone(name: str, device: str) -> Any:
    from service.engine import BackboneSpec, create_backbone

    if name not in _BACKBONES:
        _BACKBONES[name] = create_backbone(BackboneSpec(**BACKBONES[name]), device=device)
    return _BACKBONES[name]


def prepare(scope: Scope, backbone: Any) -> Any:
    """Fixed subsets (seed 0) of a dataset, preprocessed for the backbone: same images for every method.

    The product's own pipeline (`prepare_dataset`) with sizes: what is measured is what a job runs."""
    from service.engine.pipeline import SplitSpec, prepare_dataset

    key = (scope.dataset, scope.backbone, scope.n_train, scope.n_val, scope.n_test)
    if key not in _DATA:
        _DATA.clear()  # one scope's tensors at a time (224-px inputs are large)
        split = SplitSpec(seed=0, n_train=scope.n_train, n_val=scope.n_val, n_test=scope.n_test)
        _DATA[key] = prepare_dataset(dataset_path(scope.dataset), backbone, split)
    return _DATA[key]


def run_config(scope: Scope, variant: str, *, lr: float, seed: int, layer: int | None) -> dict[str, Any]:
    """What identifies one training run (its cache key): the scope's budget, the method, lr, seed."""
    spec = VARIANTS[variant]
    return {
        "backbone": scope.backbone,
        "dataset": scope.dataset,
        "engine_method": "activation" if spec["method"] == "deep_activation" else spec["method"],
        "variant_config": {k: v for k, v in spec.items() if k != "method"},
        "method": spec["method"],
        "prompt_layer": "all"
        if spec["method"].startswith("deep")
        else (0 if spec["method"] == "input" else layer),
        "seed": seed,
        "lr": lr,
        "train_images": scope.n_train,
        "n_val": scope.n_val,
        "n_test": scope.n_test,
        "epochs": scope.epochs,
        "batch_size": scope.batch_size,
    }


def train_row(
    scope: Scope, config: dict[str, Any], device: str, out_dir: str, identity: tuple[str, bool, str]
) -> dict[str, Any]:
    """Train one configuration with the engine's `fit`, evaluate it, cache and return the row."""
    from service.engine.pipeline import PreparedData, train_prompt
    from service.engine.train import TrainConfig, evaluate

    torch.set_num_threads(int(os.environ.get("ACTPROMPT_BENCH_THREADS", "1")))
    cache = RowCache(Path(out_dir), identity)
    hit = cache.get(config)
    if hit is not None:
        return hit
    started = now()
    backbone = _backbone(config["backbone"], device)
    data = prepare(scope, backbone)
    vc = config["variant_config"]
    request: Any = None
    if config["method"] == "deep_activation":
        request = "all"
    elif config["method"] == "activation":
        request = int(config["prompt_layer"])
    tcfg = TrainConfig(
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        learning_rate=config["lr"],
        seed=config["seed"],
    )
    # val in the "test" slot: evaluated once at the end, not after every epoch
    view = PreparedData(data.classes, data.train, None, data.val, data.report)
    with PeakMemory(torch.device(device)) as mem:
        trained = train_prompt(
            backbone, view, config["engine_method"], prompt_layer=request, method_options=vc, config=tcfg
        )
    result = trained.result
    classes, test = data.classes, data.test
    assert result.module is not None
    test_metrics = evaluate(result.module, test, classes=classes)
    m = result.metrics
    row = {
        **{k: config[k] for k in ("backbone", "dataset", "method", "seed", "lr", "epochs", "train_images")},
        "prompt_layer": config["prompt_layer"],
        "prompt_shape": vc.get("prompt_shape") if config["method"] == "activation" else None,
        "input_variant": vc.get("input_variant"),
        "lora_rank": vc.get("lora_rank"),
        "val_accuracy": m["test"]["top1"],
        "test_accuracy": test_metrics["top1"],
        "trainable_params": m["trainable_params"],
        "train_seconds": m["train_seconds"],
        "peak_memory_bytes": int(m.get("peak_memory_bytes", mem.used)),
        "feature_cache_bytes": m["feature_cache"]["bytes"],
        "code": row_code(config),
        "provenance": {"commit": cache.commit, "dirty": cache.dirty, "started": started, "finished": now()},
    }
    cache.put(config, row)
    return row


# --- the protocol: which runs are needed, given the ones already done -----------------------------
