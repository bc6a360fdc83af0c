"""Run every benchmark and write ``REPORT.md``: ``python -m bench.run_all [--quick]``.

``--quick`` (minutes) proves the pipeline on tiny budgets and writes to ``bench/results/quick/``;
the full run writes ``bench/results/`` (see ``bench/accuracy.py`` for its budget). Both parts save
their JSON as they go and the accuracy part resumes where a cut run stopped; ``python -m bench.report``
rebuilds the report from whatever JSON is there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench import accuracy, report, training_cost
from bench.common import log, results_dir, set_threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny budgets: minutes, not the committed numbers"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--max-minutes", type=float, default=None, help="accuracy: stop starting runs after")
    args = parser.parse_args(argv)
    set_threads()
    out = args.out or results_dir(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_cost:
        log("training cost")
        training_cost.run(args.quick, args.device, out)
    if not args.skip_accuracy:
        log("accuracy")
        accuracy.run(accuracy.QUICK if args.quick else accuracy.FULL, out, args.device, args.max_minutes)
    path = report.build(out)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {path}")


if __name__ == "__main__":
    main()
