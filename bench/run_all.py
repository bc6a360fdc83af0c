"""Run every benchmark and regenerate every published figure: ``python -m bench.run_all``.

Budgets: ``--quick`` (every code path, minutes, into ``bench/results/quick/``), the default (sized for
~110 min of a quiet 2-core CPU) and ``--budget full`` (the full budget; CPU-hours). Each part
writes its JSON with ``provenance``; the accuracy part resumes at the same commit from its row cache.
``--only accuracy,cost,serving,http,peers,fleet`` reruns some parts (or ``--only resnet20_cifar/gtsrb`` some
accuracy scopes) and merges into the files there, refusing to mix commits unless told.
Finally ``REPORT.md`` and the README's generated tables are rewritten from the JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench import accuracy, readme, report, serving, training_cost
from bench.common import log, read_json, results_dir, set_threads, write_json

PARTS = ("cost", "accuracy", "serving", "http", "peers", "fleet")

#: The peers part (bench/serving_peers.py: every server, every workload, the overload sweep) starts no
#: server after this many minutes, so with the HTTP sweep the HTTP side stays within ~25 min.
PEERS_BUDGET_MINUTES = 14.0


#: The default plan's HTTP sweep, sized to ~10 min: the single-process and two-process embedded gateway,
#: production mode (PostgreSQL + Redis), and the minimal peer server; 4 curve points of 5 s each.
#: `--budget full` runs every mode (production with two processes too) at 5 points of 8 s.
HTTP_DEFAULT_ARGS = [
    "--modes",
    "embedded,embedded_w2,production,peer",
    "--connections",
    "1,4,16,64",
    "--seconds",
    "5",
]


def run_http(out: Path, quick: bool, full: bool) -> None:
    """The HTTP benchmark (bench/serving_http.py owns the `http_vs_engine` key of serving.json)."""
    from bench import serving_http

    extra = ["--quick"] if quick else ([] if full else HTTP_DEFAULT_ARGS)
    serving_http.main(["--out", str(out / "serving_http"), "--results", str(out / "serving.json"), *extra])


#: serving.json keys written by other parts or by `make soak`: bench/serving.py rewrites the file, so they
#: are carried over (a whole run starts empty but keeps the soak, which `make bench` does not measure).
CARRIED_KEYS = ("http_vs_engine", "peers", "overload", "soak")


def carried_keys(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    doc = read_json(path)
    return {k: doc[k] for k in keys if isinstance(doc, dict) and k in doc}


def restore_keys(path: Path, saved: dict[str, Any]) -> None:
    doc = read_json(path)
    doc = doc if isinstance(doc, dict) else {}
    missing = {k: v for k, v in saved.items() if k not in doc}
    if missing:
        write_json(path, {**doc, **missing})


#: Results written by their own scripts, outside `make bench` (they take a server and a real job each), so
#: a whole run keeps them.
KEPT_FILES = ("api_lora_reference.json",)


def clear_outputs(out: Path) -> None:
    """A whole run starts from an empty results folder (the row cache and `KEPT_FILES` aside), so no
    figure survives from an earlier run or from a file this version no longer writes."""
    for path in sorted(out.iterdir()):
        if path.is_file() and path.suffix in (".json", ".md", ".png") and path.name not in KEPT_FILES:
            path.unlink()
            log(f"removed stale {path.name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets: every code path, no real numbers")
    parser.add_argument("--budget", choices=sorted(accuracy.PLANS), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="accuracy worker processes (one thread each)")
    parser.add_argument("--only", default=None, help=f"comma list of parts {PARTS} and/or accuracy scopes")
    parser.add_argument("--max-minutes", type=float, default=None, help="accuracy: stop starting runs after")
    parser.add_argument("--allow-mixed-commits", action="store_true")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's tables")
    args = parser.parse_args(argv)
    set_threads()
    plan = accuracy.PLANS[args.budget or ("quick" if args.quick else "default")]
    quick = plan.name == "quick"
    out = args.out or results_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    parts = set(PARTS) if only is None or not (only & set(PARTS)) else only & set(PARTS)
    scopes = (only - set(PARTS)) if only else set()
    t0 = time.perf_counter()
    saved = carried_keys(out / "serving.json", ("soak",) if only is None else CARRIED_KEYS)
    if only is None:
        clear_outputs(out)
    if "cost" in parts:
        log("training cost")
        training_cost.run(quick, args.device, out, workers=args.jobs)
    if "accuracy" in parts:
        log(f"accuracy: plan {plan.name}")
        accuracy.run(
            plan,
            out,
            args.device,
            jobs=args.jobs,
            max_minutes=args.max_minutes,
            only=scopes or None,
            allow_mixed=args.allow_mixed_commits,
        )
    if "serving" in parts:
        log("serving (engine level, scale, LoRA)")
        serving.main(["--parts", "engine,scale,lora", "--out", str(out), *(["--quick"] if quick else [])])
    restore_keys(out / "serving.json", saved)
    if "http" in parts:
        log("serving over HTTP")
        run_http(out, quick, full=plan.name == "full")
    if "peers" in parts:
        log("serving frameworks side by side, overload")
        from bench import serving_peers

        serving_peers.main(
            ["--results", str(out / "serving.json"), "--out", str(out / "serving_peers")]
            + (["--quick"] if quick else ["--budget-minutes", str(PEERS_BUDGET_MINUTES)])
        )
    if "fleet" in parts:
        log("fleet: round robin against prompt-affine routing over HAProxy and 3 replicas")
        from bench import fleet

        fleet.main(["--out", str(out), *(["--quick"] if quick else [])])
    path = report.build(out)
    if not quick and not args.no_readme:
        readme.update(out)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {path}")


if __name__ == "__main__":
    main()
