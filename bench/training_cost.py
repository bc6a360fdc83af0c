"""Training cost per method and per AP layer: step time, peak memory, trainable parameters.

Each configuration runs in a fresh subprocess, so one configuration's allocations (and the allocator's
cached pages) cannot inflate the next one's peak. Ratios are to VP (padding prompt) on the same
backbone, batch and input size, measured in the same run. The feature-cache part trains a real
prompt with ``fit`` and compares epoch 1 (which fills the cache) with the later epochs.

``python -m bench.training_cost [--quick] [--device cpu|cuda] [--out DIR]``
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    DATA_DIR,
    PeakMemory,
    log,
    machine_info,
    median,
    results_dir,
    set_threads,
    timed_calls,
    write_json,
)
from bench.provenance import now, provenance

GOAL_STEP_RATIO = 0.35  # AP at the CNN-preferred layer vs VP step time (bench/GOALS.md)
GOAL_MEMORY_RATIO = 0.5  # ... and peak memory
GOAL_CACHE_RATIO = 0.2  # cached epochs vs the first epoch
NUM_CLASSES = 10


def backbone_spec(name: str) -> dict[str, Any]:
    """Spec kwargs: the real-weight backbones of the accuracy benchmark; random weights otherwise."""
    from bench.accuracy import BACKBONES

    if name in BACKBONES:
        return dict(BACKBONES[name])
    return {"model": name, "weights": "random"}


def cost_plan(device: str, quick: bool) -> list[dict[str, Any]]:
    """Per backbone: batch size, steps, which AP layers, and whether the extra configurations run.

    Every real-weight backbone of the accuracy benchmark gets its per-layer curve; the 224-px
    MobileNetV2 a small batch on the CPU. The random-weight 224-px models only on CUDA.
    """
    cuda = device.startswith("cuda")
    iters = 3 if quick else 5
    # cache_images: rows the cached-step measurement holds in its feature cache (the accuracy budget's
    # training set), so its peak memory includes the cache.
    plan: list[dict[str, Any]] = [
        {
            "backbone": "resnet20_cifar",
            "batch": 128,
            "warmup": 2,
            "iters": iters,
            "layers": "few" if quick else "all",
            "extras": not quick,
            "cache_images": 512 if quick else 2000,
        },
        {
            "backbone": "mobilenetv2_100",
            "batch": 8 if not cuda else 64,
            "warmup": 1,
            "iters": 2 if quick else 3,
            "layers": "few" if quick else "some",
            "extras": not quick,
            "cache_images": 32 if quick else 256,
        },
    ]
    if not quick:
        for name in ("vit_cifar10_p4_d128_l6", "resnet56_cifar"):
            plan.append(
                {
                    "backbone": name,
                    "batch": 128,
                    "warmup": 1,
                    "iters": 3,
                    "layers": "all" if name.startswith("vit") else "few",
                    "extras": True,
                    "cache_images": 800,
                }
            )
    if cuda:
        for name in ("resnet50", "vit_base_patch16_224"):
            plan.append(
                {
                    "backbone": name,
                    "batch": 64,
                    "warmup": 2,
                    "iters": 10,
                    "layers": "some",
                    "extras": True,
                    "cache_images": 1024,
                }
            )
    return plan


def configurations(entry: dict[str, Any], layers: list[dict[str, Any]], rec: int) -> list[dict[str, Any]]:
    """The (method, layers) pairs measured for one backbone."""
    last = len(layers) - 1
    if entry["layers"] == "all":
        ap_layers = list(range(1, last + 1))
    elif entry["layers"] == "some":
        quarter, half, three = (max(1, round(last * f)) for f in (0.25, 0.5, 0.75))
        ap_layers = sorted({1, quarter, half, rec, three, last})
    else:
        ap_layers = sorted({1, rec, last})
    configs: list[dict[str, Any]] = [
        {"method": "input", "input_variant": "pad", "prompt_layer": 0},
        {"method": "linear", "prompt_layer": None},
        {"method": "norm", "prompt_layer": None},
    ]
    if entry["extras"]:
        configs.append({"method": "input", "input_variant": "additive", "prompt_layer": 0})
    configs += [{"method": "activation", "prompt_layer": i, "prompt_shape": "full"} for i in ap_layers]
    if entry["extras"]:
        configs.append({"method": "activation", "prompt_layer": rec, "prompt_shape": "channel"})
        configs.append({"method": "activation", "prompt_layer": "all", "prompt_shape": "full"})
        configs.append({"method": "deep_activation_norm", "prompt_layer": "all"})
        configs.append({"method": "lora", "prompt_layer": None, "lora_rank": 4})
        configs.append({"method": "full", "prompt_layer": None})
    return configs


# --- the worker: one configuration, in its own process ------------------------------------------


def measure_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the backbone and method, run warm-up + timed training steps, measure the step's peak memory."""
    from service.engine import BackboneSpec, create_backbone
    from service.engine.layers import resolve_prompt_layers
    from service.engine.methods import MethodConfig, create_method

    set_threads()
    device = torch.device(cfg["device"])
    backbone = create_backbone(BackboneSpec(**cfg["spec"]), device=device)
    h, w = backbone.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, h, w, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (cfg["batch"],), generator=gen).to(device)
    layers: tuple[int, ...] = ()
    if cfg["method"] in ("activation", "deep_activation_norm"):
        layers = resolve_prompt_layers(backbone.layers, cfg["prompt_layer"])
    options = {k: cfg[k] for k in ("prompt_shape", "input_variant", "lora_rank") if k in cfg}
    mcfg = MethodConfig.for_method(cfg["method"], num_classes=NUM_CLASSES, prompt_layers=layers, **options)
    torch.manual_seed(0)
    module = create_method(cfg["method"], backbone, mcfg)
    module.train()
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)
    amp = device.type == "cuda"

    def step(h_in: torch.Tensor | None = None) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            hh = module.prefix(x) if h_in is None else h_in
            logits = module.forward_from(hh)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    phase = cfg.get("phase", "both")
    out: dict[str, Any] = {
        "trainable_params": module.num_trainable(),
        "first_layer": module.first_layer,
        "resolved_layers": list(layers),
        "input_size": [h, w],
        "num_layers": len(backbone.layers) - 1,
        "recommended_layer": backbone.recommended_layer,
    }
    if phase in ("step", "both"):
        with PeakMemory(device) as mem:
            times, cpu = timed_calls(step, warmup=cfg["warmup"], iters=cfg["iters"], device=device)
        out.update(
            {
                "step_seconds": median(times),
                "step_seconds_all": times,
                "step_cpu_seconds": median(cpu),
                "peak_memory_bytes": mem.used,
                "memory_method": mem.method,
            }
        )
    if phase in ("cached", "both"):
        # The cached step through the real cache path (FeatureCache, as fit() uses it), with the cache
        # filled for `cache_images` rows inside the measured region: its peak memory includes the cache.
        # Its own process ("cached" phase): pages freed by the other phase would hide part of its peak.
        from service.engine.feature_cache import FeatureCache
        from service.engine.train import TrainConfig

        n_cache = int(cfg.get("cache_images", cfg["batch"]))
        pool = x.repeat((n_cache + cfg["batch"] - 1) // cfg["batch"], 1, 1, 1)[:n_cache]  # [N, 3, H, W]
        gen_idx = torch.Generator().manual_seed(1)
        with PeakMemory(device) as cached_mem:
            fc = FeatureCache(module.prefix, pool, max_bytes=TrainConfig().feature_cache_bytes, device=device)
            for start in range(0, n_cache, cfg["batch"]):  # epoch 1 fills the cache
                fc.get(torch.arange(start, min(n_cache, start + cfg["batch"])))

            def cached_step() -> None:
                idx = torch.randint(0, n_cache, (cfg["batch"],), generator=gen_idx)
                step(fc.get(idx))

            cached, cached_cpu = timed_calls(cached_step, warmup=1, iters=cfg["iters"], device=device)
        out.update(
            {
                "cached_step_seconds": median(cached),
                "cached_step_cpu_seconds": median(cached_cpu),
                "cached_peak_memory_bytes": cached_mem.used,
                "feature_cache_bytes": fc.nbytes,
                "feature_cache_rows": fc.capacity,
                "cache_images": n_cache,
            }
        )
    return out


def measure(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Both phases of one configuration, each in a fresh interpreter (their peaks do not mix)."""
    step = run_subprocess({**cfg, "phase": "step"}, timeout)
    if "error" in step:
        return step
    cached = run_subprocess({**cfg, "phase": "cached"}, timeout)
    if "error" in cached:
        return {**step, "error": "cached phase: " + cached["error"]}
    return {**cached, **step}


def run_subprocess(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``measure_one`` in a fresh interpreter and parse its result line."""
    cmd = [sys.executable, "-m", "bench.training_cost", "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def catalog(name: str, device: str) -> tuple[list[dict[str, Any]], int, tuple[int, int]]:
    """The layer catalog of a backbone (built once in the parent, cheap next to the measurements)."""
    from service.engine import BackboneSpec, create_backbone

    bb = create_backbone(BackboneSpec(**backbone_spec(name)), device="cpu")
    layers = [{"index": li.index, "name": li.name, "shape": list(li.shape)} for li in bb.layers]
    return layers, bb.recommended_layer, bb.input_size


# --- feature cache: epoch 1 vs later epochs, with the real training loop -------------------------


def _mark_cpu(marks: list[float], _metrics: Any) -> None:
    marks.append(time.process_time())


def feature_cache_runs(device: str, quick: bool) -> list[dict[str, Any]]:
    """Train ResNet-20 (real weights) on real GTSRB images with fit(); time every epoch."""
    import numpy as np

    from service.engine import BackboneSpec, create_backbone
    from service.engine.data import load_dataset
    from service.engine.layers import resolve_prompt_layers
    from service.engine.methods import ActivationConfig
    from service.engine.train import TrainCallbacks, TrainConfig, fit

    bb = create_backbone(BackboneSpec(**backbone_spec("resnet20_cifar")), device=device)
    ds = load_dataset(DATA_DIR / "gtsrb32.npz")
    n = 1000 if quick else 2000
    idx = np.random.default_rng(0).permutation(len(ds.train))[:n]
    images = ds.train.subset(idx).images
    x = bb.preprocessing(images)
    y = torch.from_numpy(ds.train.labels[idx])  # [n]
    last = len(bb.layers) - 1
    runs = []
    layer_choices: list[tuple[str, Any]] = [("recommended", bb.recommended_layer), ("last block", last)]
    if not quick:
        layer_choices.append(("every block (deep AP)", "all"))
    for label, layer in layer_choices:
        layers = resolve_prompt_layers(bb.layers, layer)
        cfg = TrainConfig(epochs=3, batch_size=128, learning_rate=1e-2, seed=0)
        # process CPU time per epoch as well: on a shared machine the wall clock measures the neighbours
        marks = [time.process_time()]
        res = fit(
            bb,
            "activation",
            ActivationConfig(len(ds.classes), prompt_layers=layers),
            (x, y),
            None,
            None,
            cfg,
            classes=ds.classes,
            callbacks=TrainCallbacks(on_epoch_end=functools.partial(_mark_cpu, marks)),
        )
        secs = [float(e["seconds"]) for e in res.metrics["epochs"]]
        later = sum(secs[1:]) / max(1, len(secs) - 1)
        cpu = [b - a for a, b in itertools.pairwise(marks)]
        cpu_later = sum(cpu[1:]) / max(1, len(cpu) - 1)
        runs.append(
            {
                "backbone": "resnet20_cifar",
                "prompt_layer": layer,
                "label": label,
                "n_images": n,
                "epochs": cfg.epochs,
                "first_epoch_seconds": secs[0],
                "later_epoch_seconds": later,
                "wall_ratio": later / secs[0],
                "epoch_seconds": secs,
                "first_epoch_cpu_seconds": cpu[0],
                "later_epoch_cpu_seconds": cpu_later,
                "cpu_ratio": cpu_later / cpu[0],
                # CPU time is the robust measure on a shared CPU; wall clock on CUDA
                "ratio": (cpu_later / cpu[0]) if device == "cpu" else later / secs[0],
                "cache_bytes": res.metrics["feature_cache"]["bytes"],
            }
        )
        wall_txt, cpu_txt = [round(v, 2) for v in secs], [round(c, 2) for c in cpu]
        log(f"feature cache {label}: epochs {wall_txt} s wall, {cpu_txt} s cpu")
    return runs


# --- the driver ---------------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Step and memory ratios to VP (input, pad) on the same backbone, measured in this run.

    On the CPU the step ratios use process CPU time (robust to other jobs on a shared machine; one
    torch thread); on CUDA the wall clock. Both raw times stay in the rows.
    """
    for row in rows:
        vp = next(
            (
                r
                for r in rows
                if r["backbone"] == row["backbone"]
                and r["method"] == "input"
                and r.get("input_variant") == "pad"
                and "error" not in r
            ),
            None,
        )
        if vp is None or "error" in row:
            continue
        cpu = row.get("device", "cpu") == "cpu"
        key, cached_key = (
            ("step_cpu_seconds", "cached_step_cpu_seconds")
            if cpu
            else ("step_seconds", "cached_step_seconds")
        )
        row["ratio_timer"] = "process CPU time" if cpu else "wall clock"
        row["step_ratio_to_vp"] = row[key] / vp[key]
        row["cached_step_ratio_to_vp"] = row[cached_key] / vp[key]
        row["wall_step_ratio_to_vp"] = row["step_seconds"] / vp["step_seconds"]
        row["memory_ratio_to_vp"] = (
            row["peak_memory_bytes"] / vp["peak_memory_bytes"] if vp["peak_memory_bytes"] else None
        )


def run(
    quick: bool,
    device: str,
    out_dir: Path,
    timeout: float = 900.0,
    *,
    only: set[str] | None = None,
    feature_cache: bool = True,
    workers: int = 2,
) -> dict[str, Any]:
    """Measure every configuration and write ``training_cost.json`` (rewritten after each row).

    ``only`` limits the backbones (the GPU script measures the 224-px ones, which need no files from
    ../shared); ``feature_cache=False`` skips the part that trains on real data.
    """
    set_threads()
    started = now()
    out_path = out_dir / "training_cost.json"
    payload: dict[str, Any] = {
        "machine": machine_info(torch.device(device)),
        "quick": quick,
        "goals": {
            "step_ratio": GOAL_STEP_RATIO,
            "memory_ratio": GOAL_MEMORY_RATIO,
            "cache_ratio": GOAL_CACHE_RATIO,
        },
        "results": [],
        "catalogs": {},
    }
    t0 = time.perf_counter()
    for entry in cost_plan(device, quick):
        name = entry["backbone"]
        if only is not None and name not in only:
            continue
        layers, rec, size = catalog(name, device)
        payload["catalogs"][name] = {"layers": layers, "recommended_layer": rec}
        jobs = [
            {
                **cfg,
                "spec": backbone_spec(name),
                "device": device,
                "batch": entry["batch"],
                "warmup": entry["warmup"],
                "iters": entry["iters"],
                "cache_images": entry["cache_images"],
            }
            for cfg in configurations(entry, layers, rec)
        ]
        # One fresh subprocess per configuration, `workers` at a time (CPU-time ratios: robust to that).
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for cfg, result in zip(jobs, pool.map(lambda j: measure(j, timeout), jobs), strict=True):
                row = {
                    "backbone": name,
                    "input_size": list(size),
                    "method": cfg["method"],
                    "prompt_layer": cfg.get("prompt_layer"),
                    "prompt_shape": cfg.get("prompt_shape"),
                    "input_variant": cfg.get("input_variant"),
                    "lora_rank": cfg.get("lora_rank"),
                    "batch_size": entry["batch"],
                    "device": device,
                    **result,
                }
                payload["results"].append(row)
                add_ratios(payload["results"])
                payload["provenance"] = provenance(started)
                write_json(out_path, payload)
                msg = (
                    result.get("error")
                    or f"step {row['step_seconds']:.3f}s mem {row['peak_memory_bytes'] / 2**20:.0f}MiB"
                )
                log(f"cost {name} {cfg['method']} layer={cfg.get('prompt_layer')}: {msg}")
    if not feature_cache:
        payload["total_seconds"] = time.perf_counter() - t0
        payload["provenance"] = provenance(started)
        write_json(out_path, payload)
        return payload
    runs = feature_cache_runs(device, quick)
    primary = runs[0]
    payload["feature_cache"] = {
        "first_epoch_seconds": primary["first_epoch_seconds"],
        "later_epoch_seconds": primary["later_epoch_seconds"],
        "ratio": primary["ratio"],
        "backbone": primary["backbone"],
        "prompt_layer": primary["prompt_layer"],
        "runs": runs,
    }
    payload["total_seconds"] = time.perf_counter() - t0
    payload["provenance"] = provenance(started)
    write_json(out_path, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--backbones", default=None, help="comma list (default: all of the plan)")
    parser.add_argument("--no-feature-cache", action="store_true", help="skip the epoch-timing part")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(measure_one(json.loads(args.worker))), flush=True)
        return
    out = args.out or results_dir(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.backbones.split(",")) if args.backbones else None
    run(args.quick, args.device, out, only=only, feature_cache=not args.no_feature_cache)
    log(f"wrote {out / 'training_cost.json'}")


if __name__ == "__main__":
    main()
