"""`actprompt layers | train | predict`: the engine from a shell, no server, no database.

`layers` prints a backbone's prompt-layer catalog; `train` fits a prompt on a local dataset and writes
the artifact file; `predict` scores images with an artifact file (or, with `--prompt`, on a server
through the client: see remote_commands).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the engine commands on the `actprompt` parser."""
    p = subparsers.add_parser("layers", help="list a backbone's prompt layers")
    p.add_argument("backbone", help="timm model name, e.g. resnet20_cifar, test_vit")
    p.add_argument(
        "--weights", default="random", help="hub | random | file:///path (shapes do not depend on it)"
    )
    p.add_argument("--input-size", type=int, default=None, help="square input side; default: the model's")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per layer")
    p.set_defaults(func=cmd_layers)

    p = subparsers.add_parser("train", help="train a prompt on a local dataset, write the artifact")
    p.add_argument("--backbone", required=True, help="timm model name")
    p.add_argument("--weights", default="random", help="hub | random | file:///path")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--dataset", required=True, type=Path, help="class folder, archive, csv/jsonl or .npz")
    p.add_argument("--out", required=True, type=Path, help="artifact file to write (.safetensors)")
    p.add_argument("--method", default="activation", help="activation | input | linear | norm | full")
    p.add_argument("--layer", default=None, help="index, name, comma list, 'all' or 'auto' (activation)")
    p.add_argument("--shape", default="full", choices=["full", "channel"])
    p.add_argument("--input-variant", default="pad", choices=["pad", "additive"])
    p.add_argument("--pad-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "predict",
        help="classify images: with a local artifact file (ARTIFACT IMAGE...), or on a server "
        "(--prompt ID IMAGE..., when --base-url or ACTPROMPT_BASE_URL is set)",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="[ARTIFACT] IMAGE... (images may be URLs remotely)"
    )
    p.add_argument("--prompt", default=None, help="remote: prompt id or id@version")
    p.add_argument("--base-url", default=None, help="server URL (default: $ACTPROMPT_BASE_URL)")
    p.add_argument("--api-key", default=None, help="tenant API key (default: $ACTPROMPT_API_KEY)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)


def _spec(model: str, weights: str, input_size: int | None) -> Any:
    from service.engine import BackboneSpec

    size = None if input_size is None else (input_size, input_size)
    return BackboneSpec(model, weights=weights, input_size=size)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_layers(args: argparse.Namespace) -> int:
    from service.engine import EngineError, create_backbone, list_layers

    try:
        bb = create_backbone(_spec(args.backbone, args.weights, args.input_size))
    except EngineError as exc:
        return _fail(exc)
    layers = list_layers(bb)
    if args.json:
        print(json.dumps([info.to_dict() for info in layers], indent=2))
        return 0
    print(f"{bb.spec.model}  family={bb.family}  input={bb.input_size}  features={bb.num_features}")
    print(f"{'idx':>3}  {'name':<28} {'kind':<6} {'shape':<16} {'full':>10} {'channel':>8}")
    for info in layers:
        mark = "  <- recommended" if info.recommended else ""
        shape = "x".join(str(s) for s in info.shape)
        print(
            f"{info.index:>3}  {info.name:<28} {info.kind:<6} {shape:<16} "
            f"{info.full_params:>10,} {info.channel_params:>8,}{mark}"
        )
    return 0


def _parse_layer(value: str | None) -> int | str | list[int | str] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    items: list[int | str] = [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return items[0] if len(items) == 1 else items


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.engine import EngineError, create_backbone
    from service.engine.pipeline import PipelineCallbacks, SplitSpec, prepare_dataset, train_prompt
    from service.engine.train import ProgressEvent, TrainConfig

    try:
        bb = create_backbone(_spec(args.backbone, args.weights, args.input_size), device=args.device)
        data = prepare_dataset(args.dataset, bb, SplitSpec(val_fraction=args.val_fraction, seed=args.seed))
        tcfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            optimizer=args.optimizer,
            warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
            augment=args.augment,
            seed=args.seed,
        )
        # every option is passed: one the method does not take is refused unless left at its default
        options = {"prompt_shape": args.shape, "input_variant": args.input_variant, "pad_size": args.pad_size}
        with tqdm(total=1000, unit="‰", desc=args.method, file=sys.stderr) as bar:

            def progress(e: ProgressEvent) -> None:
                bar.n = round(e.fraction * 1000)
                bar.set_postfix(epoch=f"{e.epoch}/{e.epochs}", loss=f"{e.loss:.3f}", acc=f"{e.accuracy:.3f}")
                bar.refresh()

            def probed(row: dict[str, Any]) -> None:
                print(f"auto: layer {row['index']:>3} {row['name']:<24} val top-1 {row['val_accuracy']:.3f}")

            def started(method: str, mcfg: Any, _tcfg: Any) -> None:
                n, k = len(data.train[1]), data.num_classes
                print(f"training {method} on {n} images, {k} classes, layers {mcfg.prompt_layers}")

            trained = train_prompt(
                bb,
                data,
                args.method,
                prompt_layer=_parse_layer(args.layer),
                method_options=options,
                config=tcfg,
                callbacks=PipelineCallbacks(on_progress=progress, on_layer_probe=probed, on_start=started),
            )
        result = trained.result
    except EngineError as exc:
        return _fail(exc)
    args.out.write_bytes(result.artifact.to_bytes())
    m = result.metrics
    for split in ("val", "test"):
        if split in m:
            print(f"{split}: top-1 {m[split]['top1']:.4f}  top-5 {m[split]['top5']:.4f}  (n={m[split]['n']})")
    print(f"train seconds: {m['train_seconds']:.1f}")
    print(
        f"wrote {args.out} ({len(result.artifact.to_bytes()):,} bytes, sha256 {result.artifact.sha256[:16]}…)"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Remote with `--prompt` (or a base URL); otherwise the first path is a local artifact file."""
    if args.prompt or args.base_url or os.environ.get("ACTPROMPT_BASE_URL"):
        from service.cli.remote_commands import predict_remote, run_remote

        if not args.prompt:
            print("error: remote predict needs --prompt ID", file=sys.stderr)
            return 1
        return run_remote(predict_remote)(args)
    if len(args.paths) < 2:
        print("error: local predict takes ARTIFACT IMAGE...", file=sys.stderr)
        return 1
    args.artifact, args.images = Path(args.paths[0]), [Path(p) for p in args.paths[1:]]
    return _predict_local(args)


def _predict_local(args: argparse.Namespace) -> int:
    import torch

    from service.engine import BackboneSpec, EngineError, create_backbone, decode_image
    from service.engine.artifacts import PromptArtifact
    from service.engine.mixed_batch import predict_single

    try:
        artifact = PromptArtifact.from_bytes(args.artifact.read_bytes())
        bb = create_backbone(BackboneSpec.from_dict(artifact.metadata["backbone"]), device=args.device)
        images = [decode_image(path.read_bytes()) for path in args.images]
        x = artifact.preprocessing(bb)(images)
        probs = torch.softmax(predict_single(bb, artifact, x).float(), dim=1).cpu()
    except (EngineError, OSError) as exc:
        return _fail(exc)
    k = min(args.top_k, artifact.num_classes)
    classes = artifact.classes
    out: list[dict[str, Any]] = []
    lines: list[str] = []
    for path, row in zip(args.images, probs, strict=True):
        top = row.topk(k)
        pairs = [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        out.append({"image": str(path), "predictions": [{"label": c, "probability": p} for c, p in pairs]})
        lines.append(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in pairs))
    print(json.dumps(out, indent=2) if args.json else "\n".join(lines))
    return 0
