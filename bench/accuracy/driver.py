"""Executes a plan: the runs the protocol needs, in worker processes; then the payload, collected."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.accuracy.plans import PLANS, SERVABLE, Plan, Scope
from bench.accuracy.plots import plot_sweeps
from bench.accuracy.protocol import Protocol
from bench.accuracy.runs import _backbone, run_config, train_row
from bench.common import log, results_dir, write_json
from bench.provenance import RowCache, check_merge, now, provenance, row_code


def catalogs_for(plan: Plan, device: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name in dict.fromkeys(s.backbone for s in plan.scopes):
        bb = _backbone(name, device)
        out[name] = {
            "layers": [{"index": li.index, "name": li.name, "shape": list(li.shape)} for li in bb.layers],
            "recommended_layer": bb.recommended_layer,
        }
    return out


def execute(
    plan: Plan,
    cache: RowCache,
    out_dir: Path,
    device: str,
    jobs: int,
    deadline: float | None,
    failed: dict[str, str],
) -> bool:
    """Run what the protocol needs until nothing is missing (True), or the deadline passes or only
    failed runs remain (False; `failed` maps their codes to the error)."""
    catalogs = catalogs_for(plan, device)
    protocol = Protocol(plan, cache, catalogs)
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    in_flight: dict[str, cf.Future[dict[str, Any]]] = {}
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        while True:
            needs, _ = protocol.walk()
            todo = {row_code(n.config): n for n in sorted(needs, key=lambda n: n.priority)}
            todo = {c: n for c, n in todo.items() if c not in failed}  # never retried in this run
            if not todo and not in_flight:
                return not failed
            out_of_time = deadline is not None and time.monotonic() > deadline
            for code, need in todo.items():
                if len(in_flight) >= jobs or out_of_time:
                    break
                if code not in in_flight:
                    in_flight[code] = pool.submit(
                        train_row, need.scope, need.config, device, str(out_dir), cache.identity
                    )
            if not in_flight:
                return False
            done, _ = cf.wait(in_flight.values(), return_when=cf.FIRST_COMPLETED)
            for code in [c for c, f in in_flight.items() if f in done]:
                try:
                    row = in_flight.pop(code).result()
                except Exception as exc:  # one broken configuration must not end the whole benchmark
                    failed[code] = repr(exc)[:500]
                    log(f"run {code} failed: {failed[code]}")
                    continue
                log(
                    f"{row['backbone']:>22} {row['dataset']:>12} {row['method']:>20} "
                    f"layer={row['prompt_layer']!s:>4} seed={row['seed']} lr={row['lr']:g}: "
                    f"val {row['val_accuracy']:.3f} test {row['test_accuracy']:.3f} "
                    f"({row['train_seconds']:.0f}s)"
                )


def _variant_rows(scope: Scope, sel: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for variant in scope.variants:
        s = sel.get(variant)
        if s is None:
            continue
        extra = {"scope": scope.name, "settings_from": scope.settings_from} if scope.settings_from else {}
        for row in s["rows"]:
            servable = variant in SERVABLE
            yield {**row, "variant": variant, "lr_grid": s["lr_grid"], "servable": servable, **extra}


def collect(plan: Plan, cache: RowCache, device: str) -> dict[str, Any]:
    """The accuracy.json payload from the cache: headline rows, grids, sweeps (whatever is done)."""
    catalogs = catalogs_for(plan, device)
    _, selection = Protocol(plan, cache, catalogs).walk()
    results, sweeps, grids, borrowed = [], [], [], []
    for scope in plan.scopes:
        sel = selection.get(scope.name, {})
        if scope.settings_from is not None:  # its own list: a table per (backbone, dataset) keeps one budget
            borrowed += list(_variant_rows(scope, sel))
            continue
        results += list(_variant_rows(scope, sel))
        for row in sel.get("_sweep", []):
            sweeps.append({**row, "chosen": row["prompt_layer"] == sel["_ap_layer"]["ap"]})
        for variant in scope.variants:
            s = sel.get(variant)
            if s is not None:
                grid_rows = [
                    cache.get(run_config(scope, variant, lr=lr, seed=0, layer=s["grid_layer"]))
                    for lr in s["lr_grid"]
                ]
                grids.append(
                    {
                        "backbone": scope.backbone,
                        "dataset": scope.dataset,
                        "variant": variant,
                        "lr": s["lr"],
                        "lr_grid": s["lr_grid"],
                        "val_accuracy": [r["val_accuracy"] if r else None for r in grid_rows],
                        "at_edge": s["lr"] in (s["lr_grid"][0], s["lr_grid"][-1]) and len(s["lr_grid"]) > 1,
                    }
                )
    missing = [f"{s.name}/{v}" for s in plan.scopes for v in s.variants if v not in selection.get(s.name, {})]
    return {
        "results": results,
        "reference_budget": borrowed,
        "lr_search": grids,
        "sweep": sweeps,
        "catalogs": catalogs,
        "budget": {
            "plan": plan.name,
            "note": plan.note,
            "optimizer": plan.optimizer,
            "max_minutes": plan.max_minutes,
            "scopes": [asdict(s) for s in plan.scopes],
        },
        "complete": not missing,
        "missing": missing,
    }


def run(
    plan: Plan,
    out_dir: Path,
    device: str = "cpu",
    *,
    jobs: int = 2,
    max_minutes: float | None = None,
    only: set[str] | None = None,
    allow_mixed: bool = False,
    identity: tuple[str, bool, str] | None = None,
) -> dict[str, Any]:
    """Run ``plan`` (``only``: these scopes or backbones) and write ``out_dir/accuracy.json``.

    ``identity``: the code identity the row cache is keyed by (default: this checkout's, now)."""
    started = now()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    path = out_dir / "accuracy.json"
    old = check_merge(path, bool(only), allow_mixed)
    if only:
        # a tagged scope comes with its cell's name, so a borrowing scope keeps its source
        keep = tuple(s for s in plan.scopes if {s.name, s.cell, s.backbone} & only)
        plan = replace(plan, scopes=keep)
    max_minutes = max_minutes if max_minutes is not None else plan.max_minutes
    deadline = None if not max_minutes else time.monotonic() + 60 * max_minutes
    cache = RowCache(out_dir, identity)
    failed: dict[str, str] = {}
    execute(plan, cache, out_dir, device, jobs, deadline, failed)
    payload = collect(plan, cache, device)
    payload["errors"] = failed
    if old is not None:  # merge by scope: rows of the other scopes stay, with their own provenance
        mine = {(s.backbone, s.dataset) for s in plan.scopes}
        for key in ("results", "reference_budget", "lr_search", "sweep"):
            kept = [r for r in old.get(key, []) if (r["backbone"], r["dataset"]) not in mine]
            payload[key] = kept + payload[key]
        payload["catalogs"] = {**old.get("catalogs", {}), **payload["catalogs"]}
    timing = {
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds_main": _cpu_seconds() - cpu0,
        "jobs": jobs,
    }
    prov = provenance(started, identity=cache.identity, extra={"plan": plan.name, **timing})
    payload = {"provenance": prov, **payload}
    if old is not None:
        commits = {r["provenance"]["commit"] for r in payload["results"] if "provenance" in r}
        payload["provenance"]["row_commits"] = sorted(commits)
    write_json(path, payload)
    plot_sweeps(payload, out_dir)
    return payload


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> None:
    import bench.accuracy as package

    parser = argparse.ArgumentParser(
        description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", choices=sorted(PLANS), default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting runs after this")
    parser.add_argument("--only", default=None, help="comma list of scopes (backbone/dataset) or backbones")
    parser.add_argument("--allow-mixed-commits", action="store_true")
    args = parser.parse_args(argv)
    plan = PLANS[args.budget or ("quick" if args.quick else "default")]
    out = args.out or results_dir(plan.name == "quick")
    only = set(args.only.split(",")) if args.only else None
    run(
        plan,
        out,
        args.device,
        jobs=args.jobs,
        max_minutes=args.max_minutes,
        only=only,
        allow_mixed=args.allow_mixed_commits,
    )
    log(f"wrote {out / 'accuracy.json'}")
