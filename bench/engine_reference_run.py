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

import torch

from service.engine import BackboneSpec, create_backbone
from service.engine.pipeline import SplitSpec, prepare_dataset, train_prompt
from service.engine.train import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"


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
    split = SplitSpec(seed=0, n_train=args.train, n_val=0, n_test=args.test)
    data = prepare_dataset(SHARED / "data" / "gtsrb32.npz", bb, split)
    train, classes = data.train, data.classes
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, optimizer="adamw"
    )
    k = len(classes)
    print(
        f"ResNet-20 -> GTSRB-{k}: {len(train[1])} train, {len(data.test[1]) if data.test else 0} test, "
        f"{args.epochs} epochs, "
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
        layer: str | None = item[3:] if item.startswith("ap:") else None
        method = "activation" if layer is not None else item
        options = {"input_variant": "pad"} if method == "input" else {}
        t0 = time.perf_counter()
        trained = train_prompt(bb, data, method, prompt_layer=layer, method_options=options, config=cfg)
        m = trained.metrics
        ep = [e["seconds"] for e in m["epochs"]]
        later = sum(ep[1:]) / max(1, len(ep) - 1)
        prompt_params = m["trainable_params"] - (bb.num_features + 1) * k
        row = {
            "method": method if not item.startswith("ap:") else f"activation@{item[3:]}",
            "layers": trained.layers,
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
