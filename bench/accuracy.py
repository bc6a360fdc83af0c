"""Accuracy of AP against VP, linear probe, norm-tune and full fine-tuning on real weights and data.

Protocol (fixed, stated budgets; the test split is never used to choose anything):
1. Learning rate per (backbone, method variant): a small grid, trained on the first dataset at seed 0,
   chosen by validation accuracy (the validation split is carved, stratified, from the training images).
2. Layer sweep per (backbone, dataset): AP at every layer of the catalog (or every k-th on deep
   backbones), one seed, the sweep budget. Its best layer *on validation* is the "AP best" layer.
3. Headline: every method variant at the headline budget, several seeds; mean ± std of test accuracy.
4. Auto layer: ``auto_select_layer`` on the same data; within 1 point of the sweep's best test accuracy?

Results are appended to ``accuracy.json`` as they come; a rerun skips rows already there (resume).
``python -m bench.accuracy [--quick] [--out DIR]``
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    DATA_DIR,
    DATASETS,
    REAL_BACKBONES,
    log,
    machine_info,
    read_json,
    results_dir,
    set_threads,
    write_json,
)

Tensors = tuple[torch.Tensor, torch.Tensor]

#: Method variants: (engine method, how to build its MethodConfig beyond num_classes).
VARIANTS: dict[str, dict[str, Any]] = {
    "ap_recommended": {"method": "activation", "layer": "recommended", "prompt_shape": "full"},
    "ap_best": {"method": "activation", "layer": "best", "prompt_shape": "full"},
    "ap_layer": {"method": "activation", "layer": "given", "prompt_shape": "full"},  # the sweep
    "ap_channel": {"method": "activation", "layer": "recommended", "prompt_shape": "channel"},
    "deep_ap": {"method": "activation", "layer": "all", "prompt_shape": "full"},
    "vp_pad": {"method": "input", "input_variant": "pad"},
    "vp_additive": {"method": "input", "input_variant": "additive"},
    "linear": {"method": "linear"},
    "norm": {"method": "norm"},
    "full": {"method": "full"},
}
VARIANT_LABELS = {
    "ap_recommended": "AP, recommended layer",
    "ap_best": "AP, best layer (val)",
    "ap_layer": "AP at a given layer (sweep)",
    "ap_channel": "AP, channel shape",
    "deep_ap": "deep AP (every block)",
    "vp_pad": "VP, padding",
    "vp_additive": "VP, additive",
    "linear": "linear probe",
    "norm": "norm-tune",
    "full": "full fine-tuning",
}
PROMPT_LRS = (3e-3, 1e-2, 3e-2)
FULL_LRS = (1e-4, 3e-4, 1e-3)


@dataclass(frozen=True)
class BackbonePlan:
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    sweep_stride: int = 1  # 1 = every layer; k = every k-th plus the stem, the recommended and the last
    lr_search: bool = True  # False: reuse the learning rates chosen for the first backbone


@dataclass(frozen=True)
class Plan:
    """One benchmark budget; ``FULL`` and ``QUICK`` below."""

    name: str
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    batch_size: int
    sweep_n_train: int
    sweep_epochs: int
    datasets: tuple[str, ...]
    backbones: dict[str, BackbonePlan]
    lr_grid: bool = True  # False: a single lr per method family (1e-2 / 3e-4)
    auto: bool = True


ALL_VARIANTS = tuple(v for v in VARIANTS if v != "ap_layer")
#: Order of work: ResNet-20 at seed 0, the ViT, ResNet-20's extra seeds, then ResNet-56, so a run cut
#: by ``--max-minutes`` still covers the most important comparisons; a rerun resumes where it stopped.
FULL = Plan(
    name="full",
    n_train=800,
    n_val=200,
    n_test=800,
    epochs=3,
    batch_size=32,
    sweep_n_train=400,
    sweep_epochs=3,
    datasets=("gtsrb", "tinyimagenet", "mnist"),
    backbones={
        "resnet20_cifar": BackbonePlan(ALL_VARIANTS, seeds=(0, 1, 2)),
        "vit_cifar10_p4_d128_l6": BackbonePlan(
            ("ap_recommended", "ap_best", "ap_channel", "deep_ap", "vp_pad", "linear", "norm"),
            seeds=(0,),
            lr_search=False,
        ),
        "resnet56_cifar": BackbonePlan(
            ("ap_recommended", "ap_best", "deep_ap", "vp_pad", "linear", "norm"),
            seeds=(0,),
            sweep_stride=4,
            lr_search=False,
        ),
    },
)
QUICK = Plan(
    name="quick",
    n_train=256,
    n_val=128,
    n_test=256,
    epochs=2,
    batch_size=32,
    sweep_n_train=256,
    sweep_epochs=2,
    datasets=("gtsrb", "mnist"),
    backbones={
        "resnet20_cifar": BackbonePlan(
            ("ap_recommended", "ap_best", "deep_ap", "vp_pad", "linear", "norm"), seeds=(0,), sweep_stride=20
        ),
    },
    lr_grid=False,
)


#: Variants that backpropagate through (almost) the whole backbone: a 2-point grid keeps them affordable.
EXPENSIVE = frozenset({"deep_ap", "vp_pad", "vp_additive", "norm", "full"})


def lr_grid(variant: str, plan: Plan) -> tuple[float, ...]:
    if variant == "full":
        return (FULL_LRS[1], FULL_LRS[2]) if plan.lr_grid else (3e-4,)
    if not plan.lr_grid:
        return (1e-2,)
    return (PROMPT_LRS[1], PROMPT_LRS[2]) if variant in EXPENSIVE else PROMPT_LRS


# --- data ---------------------------------------------------------------------------------------


_DATA_CACHE: dict[tuple[Any, ...], Any] = {}


def prepare(dataset: str, backbone: Any, plan: Plan) -> Any:
    """Fixed subsets (seed 0) of a dataset, preprocessed for the backbone; same images for every method.

    The product's own pipeline (`prepare_dataset`), with sizes: what is measured is what a job runs."""
    from service.engine.pipeline import SplitSpec, prepare_dataset

    key = (dataset, backbone.input_size, backbone.spec.mean, backbone.spec.std, plan.n_train, plan.n_val)
    if key not in _DATA_CACHE:
        split = SplitSpec(seed=0, n_train=plan.n_train, n_val=plan.n_val, n_test=plan.n_test)
        _DATA_CACHE[key] = prepare_dataset(DATA_DIR / DATASETS[dataset], backbone, split)
    return _DATA_CACHE[key]


# --- one training run ---------------------------------------------------------------------------


def make_config(variant: str, backbone: Any, layer: int | None) -> tuple[str, Any, dict[str, Any], Any]:
    """(engine method, the prompt_layer request, the method's options, the prompt_layer to record)."""
    spec = VARIANTS[variant]
    method = spec["method"]
    if method == "activation":
        request: Any = "all" if spec["layer"] == "all" else layer
        return method, request, {"prompt_shape": spec["prompt_shape"]}, request
    if method == "input":
        return method, None, {"input_variant": spec["input_variant"]}, 0
    return method, None, {}, None


class Runner:
    """Trains and records runs; skips those already in the results file (so a cut run resumes)."""

    def __init__(self, out_path: Path, plan: Plan, max_minutes: float | None = None) -> None:
        self.out_path = out_path
        self.plan = plan
        self.deadline = None if not max_minutes else time.monotonic() + 60 * max_minutes
        self.cpu0 = _cpu_seconds()
        old = read_json(out_path) or {}
        self.rows: list[dict[str, Any]] = list(old.get("results", [])) if old.get("plan") == plan.name else []
        self.extra: dict[str, Any] = {"lr": {}, "best_layer": {}, "auto": [], "catalogs": {}}
        if old.get("plan") == plan.name:
            self.extra.update({k: old.get(k, v) for k, v in self.extra.items()})
        self.started = time.perf_counter()
        same_plan = old.get("plan") == plan.name
        self.previous_elapsed = float(old.get("elapsed_seconds", 0.0)) if same_plan else 0.0
        self.previous_cpu = float(old.get("cpu_seconds", 0.0)) if same_plan else 0.0
        self.complete = False

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    @staticmethod
    def key(row: dict[str, Any]) -> str:
        """What makes two runs the same training (the variant name and role do not)."""
        fields = (
            "backbone",
            "dataset",
            "method",
            "prompt_layer",
            "prompt_shape",
            "input_variant",
            "seed",
            "learning_rate",
            "n_train",
            "epochs",
        )
        return json.dumps([row.get(f) for f in fields])

    def save(self) -> None:
        write_json(
            self.out_path,
            {
                "plan": self.plan.name,
                "budget": asdict(self.plan),
                "machine": machine_info(),
                "results": self.rows,
                **self.extra,
                "elapsed_seconds": self.previous_elapsed + time.perf_counter() - self.started,
                "cpu_seconds": self.previous_cpu + _cpu_seconds() - self.cpu0,
                "complete": self.complete,
            },
        )

    def train(
        self,
        backbone_name: str,
        backbone: Any,
        dataset: str,
        data: Any,
        variant: str,
        *,
        seed: int,
        lr: float,
        role: str,
        layer: int | None = None,
        n_train: int | None = None,
        epochs: int | None = None,
    ) -> dict[str, Any]:
        from service.engine.pipeline import PreparedData, train_prompt
        from service.engine.train import TrainConfig, evaluate

        n = min(n_train or len(data.train[0]), len(data.train[0]))
        ep = epochs or self.plan.epochs
        method, request, options, record = make_config(variant, backbone, layer)
        row: dict[str, Any] = {
            "backbone": backbone_name,
            "dataset": dataset,
            "method": method,
            "variant": variant,
            "prompt_layer": record,
            "prompt_shape": options.get("prompt_shape"),
            "input_variant": options.get("input_variant"),
            "seed": seed,
            "learning_rate": lr,
            "n_train": n,
            "epochs": ep,
        }
        k = self.key(row)
        same = [old for old in self.rows if self.key(old) == k]
        mine = [old for old in same if old["variant"] == variant and old["role"] == role]
        if mine:
            return mine[0]
        if same:  # the identical run was already trained under another name or role: record, not retrain
            copy = {**same[0], "variant": variant, "role": role, "reused": True}
            self.rows.append(copy)
            self.save()
            return copy
        if self.out_of_time():
            raise OutOfTime
        cfg = TrainConfig(epochs=ep, batch_size=self.plan.batch_size, learning_rate=lr, seed=seed)
        t0 = time.perf_counter()
        # val goes in the "test" slot: evaluated once at the end, not after every epoch (cheaper)
        view = PreparedData(data.classes, (data.train[0][:n], data.train[1][:n]), None, data.val, data.report)
        trained = train_prompt(
            backbone, view, method, prompt_layer=request, method_options=options, config=cfg
        )
        result = trained.result
        m = result.metrics
        assert result.module is not None
        test = evaluate(result.module, data.test, classes=data.classes)
        row.update(
            {
                "test_accuracy": test["top1"],
                "val_accuracy": m["test"]["top1"],
                "trainable_params": m["trainable_params"],
                "train_seconds": m["train_seconds"],
                "wall_seconds": time.perf_counter() - t0,
                "role": role,
            }
        )
        self.rows.append(row)
        self.save()
        log(
            f"{backbone_name:>22} {dataset:>12} {variant:>14} layer={record!s:>4} seed={seed} lr={lr:g}: "
            f"val {row['val_accuracy']:.3f} test {row['test_accuracy']:.3f} "
            f"({row['wall_seconds']:.0f}s, {role})"
        )
        return row


# --- the protocol -------------------------------------------------------------------------------


def sweep_layers(backbone: Any, stride: int) -> list[int]:
    last = len(backbone.layers) - 1
    if stride <= 1:
        return list(range(0, last + 1))
    return sorted({0, 1, backbone.recommended_layer, last, *range(1, last + 1, stride)})


def _create(name: str, device: str) -> Any:
    from service.engine.backbones import BackboneSpec, create_backbone

    entry = REAL_BACKBONES[name]
    return create_backbone(
        BackboneSpec(entry["model"], weights=Path(entry["weights"]).as_uri()), device=device
    )


def choose_lrs(runner: Runner, name: str, backbone: Any, bplan: BackbonePlan) -> dict[str, float]:
    """Learning rate per variant on the first dataset's validation split (seed 0), or transferred."""
    plan = runner.plan
    chosen: dict[str, float] = runner.extra["lr"].setdefault(name, {})
    if not bplan.lr_search:
        first = next(iter(plan.backbones))
        source = runner.extra["lr"].get(first, {})
        for variant in bplan.variants:
            chosen.setdefault(variant, source.get(variant, lr_grid(variant, plan)[0]))
        runner.save()
        return chosen
    lr_dataset = plan.datasets[0]
    data = prepare(lr_dataset, backbone, plan)
    rec = backbone.recommended_layer
    for variant in bplan.variants:
        if variant == "ap_best" or variant in chosen:
            continue
        rows = [
            runner.train(
                name, backbone, lr_dataset, data, variant, seed=0, lr=lr, role="lr_search", layer=rec
            )
            for lr in lr_grid(variant, plan)
        ]
        chosen[variant] = max(rows, key=lambda r: r["val_accuracy"])["learning_rate"]
        runner.save()
    chosen.setdefault("ap_best", chosen.get("ap_recommended", 1e-2))
    return chosen


def run_backbone(runner: Runner, name: str, bplan: BackbonePlan, device: str, seeds: tuple[int, ...]) -> None:
    """Learning rates, then per dataset: sweep, headline runs for ``seeds``, auto layer."""
    plan = runner.plan
    backbone = _create(name, device)
    runner.extra.setdefault("catalogs", {})[name] = {
        "layers": [{"index": li.index, "name": li.name, "shape": list(li.shape)} for li in backbone.layers],
        "recommended_layer": backbone.recommended_layer,
    }
    rec = backbone.recommended_layer
    chosen = choose_lrs(runner, name, backbone, bplan)
    ap_lr = chosen.get("ap_recommended", 1e-2)
    for dataset in plan.datasets:
        data = prepare(dataset, backbone, plan)
        # layer sweep (one seed, the sweep budget); best layer by validation accuracy
        sweep = [
            runner.train(
                name,
                backbone,
                dataset,
                data,
                "ap_layer",
                seed=0,
                lr=ap_lr,
                role="sweep",
                layer=layer,
                n_train=plan.sweep_n_train,
                epochs=plan.sweep_epochs,
            )
            for layer in sweep_layers(backbone, bplan.sweep_stride)
        ]
        candidates = [r for r in sweep if r["prompt_layer"] != 0]  # layer 0 is VP, not AP
        best = max(candidates, key=lambda r: r["val_accuracy"])["prompt_layer"]
        runner.extra["best_layer"].setdefault(name, {})[dataset] = best
        runner.save()
        for variant in bplan.variants:
            layer = best if variant == "ap_best" else rec
            for seed in seeds:
                runner.train(
                    name,
                    backbone,
                    dataset,
                    data,
                    variant,
                    seed=seed,
                    lr=chosen[variant],
                    role="headline",
                    layer=layer,
                )
        if plan.auto:
            run_auto(runner, name, backbone, dataset, data, sweep)


def _load_auto() -> Callable[..., Any] | None:
    try:
        from service.engine.layer_search import auto_select_layer
    except ImportError:
        return None
    return auto_select_layer


def run_auto(runner: Runner, name: str, backbone: Any, dataset: str, data: Any, sweep: list[dict]) -> None:
    """Does auto land within 1 point of the sweep's best (test) layer, and what does it cost?"""
    done = {(a["backbone"], a["dataset"]) for a in runner.extra["auto"]}
    if (name, dataset) in done:
        return
    auto = _load_auto()
    if auto is None:
        runner.extra["auto"].append(
            {"backbone": name, "dataset": dataset, "error": "auto_select_layer missing"}
        )
        runner.save()
        return
    kwargs: dict[str, Any] = {}
    params = inspect.signature(auto).parameters
    if "classes" in params:
        kwargs["classes"] = data.classes
    if "num_classes" in params:
        kwargs["num_classes"] = len(data.classes)
    n = len(data.train[0])
    t0 = time.perf_counter()
    try:
        chosen, rows = auto(backbone, data.train, data.val, **kwargs)
    except Exception as exc:  # report, do not lose the rest of the benchmark
        runner.extra["auto"].append({"backbone": name, "dataset": dataset, "error": repr(exc)[:300]})
        runner.save()
        return
    seconds = time.perf_counter() - t0
    if int(chosen) not in {r["prompt_layer"] for r in sweep}:  # a strided sweep skipped it: measure it
        sweep = [
            *sweep,
            runner.train(
                name,
                backbone,
                dataset,
                data,
                "ap_layer",
                seed=0,
                lr=runner.extra["lr"].get(name, {}).get("ap_recommended", 1e-2),
                role="sweep",
                layer=int(chosen),
                n_train=runner.plan.sweep_n_train,
                epochs=runner.plan.sweep_epochs,
            ),
        ]
    by_layer = {r["prompt_layer"]: r["test_accuracy"] for r in sweep}
    best_layer = max((r for r in sweep if r["prompt_layer"] != 0), key=lambda r: r["test_accuracy"])
    full_run = next(
        (
            r
            for r in runner.rows
            if r["backbone"] == name
            and r["dataset"] == dataset
            and r["variant"] == "ap_recommended"
            and r["role"] == "headline"
            and r["n_train"] == n
        ),
        None,
    )
    auto_acc = by_layer.get(int(chosen))
    runner.extra["auto"].append(
        {
            "backbone": name,
            "dataset": dataset,
            "auto_layer": int(chosen),
            "auto_seconds": seconds,
            "full_run_seconds": full_run["wall_seconds"] if full_run else None,
            "cost_fraction": seconds / full_run["wall_seconds"] if full_run else None,
            "sweep_best_layer": best_layer["prompt_layer"],
            "sweep_best_test": best_layer["test_accuracy"],
            "auto_layer_sweep_test": auto_acc,
            "within_1_point": None
            if auto_acc is None
            else bool(auto_acc >= best_layer["test_accuracy"] - 0.01),
            "probe_rows": json.loads(json.dumps(rows, default=str))[:64],
        }
    )
    runner.save()
    log(f"auto {name} {dataset}: layer {chosen} in {seconds:.0f}s (sweep best {best_layer['prompt_layer']})")


class OutOfTime(Exception):
    """The --max-minutes budget is spent; what finished is saved and a rerun resumes."""


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def run(
    plan: Plan,
    out_dir: Path,
    device: str = "cpu",
    max_minutes: float | None = None,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Run the plan (``only``: these backbones) into ``out_dir/accuracy.json``, resuming what is there."""
    set_threads()
    runner = Runner(out_dir / "accuracy.json", plan, max_minutes)
    try:
        _run_phases(runner, plan, device, only)
        runner.complete = True
    except OutOfTime:
        log(f"accuracy: --max-minutes {max_minutes} reached; rerun to resume")
    runner.save()
    return dict(read_json(runner.out_path))


def _run_phases(runner: Runner, plan: Plan, device: str, only: set[str] | None = None) -> None:
    # seed 0 of the first two backbones, the first backbone's extra seeds, then the rest
    names = list(plan.backbones)
    order = [(n, plan.backbones[n].seeds[:1]) for n in names[:2]]
    order += [(n, plan.backbones[n].seeds[1:]) for n in names[:1] if len(plan.backbones[n].seeds) > 1]
    order += [(n, plan.backbones[n].seeds[:1]) for n in names[2:]]
    order += [(n, plan.backbones[n].seeds[1:]) for n in names[1:] if len(plan.backbones[n].seeds) > 1]
    for name, seeds in order:
        if only is not None and name not in only:
            continue
        log(f"accuracy: {name}, seeds {seeds}")
        run_backbone(runner, name, plan.backbones[name], device, seeds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting runs after this")
    parser.add_argument("--backbones", default=None, help="comma list: only these backbones of the plan")
    args = parser.parse_args(argv)
    out = args.out or results_dir(args.quick)
    only = set(args.backbones.split(",")) if args.backbones else None
    run(QUICK if args.quick else FULL, out, args.device, args.max_minutes, only)
    log(f"wrote {out / 'accuracy.json'}")


if __name__ == "__main__":
    main()
