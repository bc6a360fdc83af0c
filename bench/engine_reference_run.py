"""Reference run of the engine: ResNet-20 (CIFAR-10 weights) -> GTSRB-43, every method, one table.

Not a test: it measures test accuracy and training seconds of AP at several layers, deep AP ("all"),
VP (padding prompt), linear probe and norm-tune on the same images with the same budget.

    .venv/bin/python -m bench.engine_reference_run --train 8000 --test 4000 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from service.engine import BackboneSpec, create_backbone, resolve_prompt_layers
from service.engine.backbones import Backbone
from service.engine.data import preprocess
from service.engine.methods import MethodConfig
from service.engine.train import TrainConfig, fit

SHARED = Path(__file__).resolve().parents[2] / "shared"


def load_subset(path: Path, bb: Backbone, n_train: int, n_test: int, seed: int) -> tuple:
    """A seeded random subset (the file is sorted by class), normalised with the backbone's mean/std."""
    d = np.load(path)
    rng = np.random.default_rng(seed)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        idx = np.sort(rng.permutation(len(d[f"y_{split}"]))[:n])
        x = preprocess(d[f"x_{split}"][idx], bb.input_size, bb.spec.mean, bb.spec.std)  # type: ignore[arg-type]
        out.append((x, torch.from_numpy(d[f"y_{split}"][idx]).long()))
    return out[0], out[1], [str(c) for c in d["classes"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--test", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="linear,ap:layer2.2,ap:layer3.0,ap:layer1.2,input,ap:all,norm")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    weights = (SHARED / "weights" / "resnet20-12fca82f.th").as_uri()
    bb = create_backbone(BackboneSpec("resnet20_cifar", weights=weights))
    train, test, classes = load_subset(SHARED / "data" / "gtsrb32.npz", bb, args.train, args.test, seed=0)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, optimizer="adamw"
    )
    k = len(classes)
    print(
        f"ResNet-20 -> GTSRB-{k}: {len(train[1])} train, {len(test[1])} test, {args.epochs} epochs, "
        f"batch {args.batch_size}, AdamW lr {args.lr}, {args.threads} threads, no augmentation",
        flush=True,
    )
    print(
        f"{'method':<22} {'layers':<14} {'params':>8} {'test top-1':>10} {'top-5':>7} {'train s':>8} "
        f"{'epoch1 s':>8} {'later s':>8}",
        flush=True,
    )
    rows = []
    for item in args.methods.split(","):
        if item.startswith("ap:"):
            layers = resolve_prompt_layers(bb.layers, item[3:])
            method, mcfg = "activation", MethodConfig(k, layers)
        elif item == "input":
            method, mcfg = "input", MethodConfig(k, input_variant="pad")
        else:
            method, mcfg = item, MethodConfig(k)
        t0 = time.perf_counter()
        res = fit(bb, method, mcfg, train, None, test, cfg, classes=classes)
        m = res.metrics
        ep = [e["seconds"] for e in m["epochs"]]
        later = sum(ep[1:]) / max(1, len(ep) - 1)
        prompt_params = m["trainable_params"] - (bb.num_features + 1) * k
        row = {
            "method": method if not item.startswith("ap:") else f"activation@{item[3:]}",
            "layers": list(mcfg.prompt_layers),
            "prompt_params": prompt_params,
            "test_top1": round(m["test"]["top1"], 4),
            "test_top5": round(m["test"]["top5"], 4),
            "train_seconds": round(m["train_seconds"], 1),
            "epoch1_seconds": round(ep[0], 1),
            "later_epoch_seconds": round(later, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        layer_txt = ",".join(map(str, row["layers"])) or "-"
        print(
            f"{row['method']:<22} {layer_txt:<14} {prompt_params:>8,} {row['test_top1']:>10.4f} "
            f"{row['test_top5']:>7.4f} {row['train_seconds']:>8.1f} {row['epoch1_seconds']:>8.1f} "
            f"{row['later_epoch_seconds']:>8.1f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
