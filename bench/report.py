# ruff: noqa: RUF001 (the report text uses the multiplication sign and the en dash on purpose)
"""Turn the benchmark JSON into ``REPORT.md`` and its plots (also alone: ``python -m bench.report``)."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.accuracy import VARIANT_LABELS
from bench.common import fmt_bytes, fmt_params, md_table, mean_std, read_json, results_dir

DATASET_LABELS = {"gtsrb": "GTSRB-43", "tinyimagenet": "Tiny-ImageNet-200 (32 px)", "mnist": "MNIST"}
HEADLINE_ORDER = [
    "ap_recommended",
    "ap_best",
    "ap_channel",
    "deep_ap",
    "vp_pad",
    "vp_additive",
    "linear",
    "norm",
    "full",
]


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _headline(acc: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in acc.get("results", []):
        if r.get("role") == "headline":
            groups[(r["backbone"], r["dataset"], r["variant"])].append(r)
    return groups


def _mean(rows: list[dict[str, Any]]) -> float | None:
    return mean_std([r["test_accuracy"] for r in rows])[0] if rows else None


def headline_tables(acc: dict[str, Any]) -> tuple[str, list[str]]:
    """One table per backbone; also returns the findings it can state in numbers."""
    groups = _headline(acc)
    backbones = list(dict.fromkeys(k[0] for k in groups))
    datasets = list(dict.fromkeys(k[1] for k in groups))
    out, findings = [], []
    for bb in backbones:
        rows = []
        for variant in HEADLINE_ORDER:
            cells = []
            present = False
            for ds in datasets:
                runs = groups.get((bb, ds, variant), [])
                if not runs:
                    cells.append("")
                    continue
                present = True
                m, s = mean_std([r["test_accuracy"] for r in runs])
                value = f"{100 * m:.1f} ± {100 * s:.1f}" if len(runs) > 1 else f"{100 * m:.1f}"
                layer = runs[0]["prompt_layer"]
                at = f" @{layer}" if variant in ("ap_best", "ap_recommended", "ap_channel") else ""
                seeds = f", n={len(runs)}" if len(runs) > 1 else ""
                cells.append(f"{value}{at} ({fmt_params(runs[0]['trainable_params'])}{seeds})")
            if present:
                rows.append([VARIANT_LABELS[variant], *cells])
        heads = ["method", *[f"{DATASET_LABELS.get(d, d)}: test % (params)" for d in datasets]]
        out.append(f"### {bb}\n\n" + md_table(heads, rows))
        for ds in datasets:
            g = {v: _mean(groups.get((bb, ds, v), [])) for v in HEADLINE_ORDER}
            ap = g["ap_recommended"]  # the product's default; no choice made on the test split
            vp = max((x for x in (g["vp_pad"], g["vp_additive"]) if x is not None), default=None)
            parts = []
            if ap is not None and vp is not None:
                parts.append(f"AP@recommended {pct(ap)} vs best VP {pct(vp)} ({100 * (ap - vp):+.1f})")
            if g["ap_best"] is not None:
                parts.append(f"AP@best-val layer {pct(g['ap_best'])}")
            if ap is not None and g["linear"] is not None:
                parts.append(f"vs linear {pct(g['linear'])} ({100 * (ap - g['linear']):+.1f})")
            if g["deep_ap"] is not None and g["norm"] is not None:
                parts.append(
                    f"deep AP {pct(g['deep_ap'])} vs norm-tune {pct(g['norm'])} "
                    f"({100 * (g['deep_ap'] - g['norm']):+.1f})"
                )
            if g["full"] is not None:
                parts.append(f"full fine-tuning {pct(g['full'])}")
            if parts:
                findings.append(f"{bb} / {DATASET_LABELS.get(ds, ds)}: " + "; ".join(parts))
    return "\n\n".join(out), findings


def missing_headline(acc: dict[str, Any]) -> list[str]:
    """Headline (backbone, dataset, variant, seed) combinations of the plan that have no result yet."""
    budget = acc.get("budget") or {}
    have = {
        (r["backbone"], r["dataset"], r["variant"], r["seed"])
        for r in acc.get("results", [])
        if r.get("role") == "headline"
    }
    missing = []
    for bb, bplan in budget.get("backbones", {}).items():
        for ds in budget.get("datasets", []):
            for variant in bplan["variants"]:
                for seed in bplan["seeds"]:
                    if (bb, ds, variant, seed) not in have:
                        missing.append(f"{bb}/{ds}/{variant}/seed {seed}")
    return missing


def accuracy_goals(acc: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    groups = _headline(acc)
    checks: list[tuple[str, bool | None, str]] = []
    keys = sorted({(k[0], k[1]) for k in groups})
    beats_vp, beats_lin, deep_norm = [], [], []
    for bb, ds in keys:
        g = {v: _mean(groups.get((bb, ds, v), [])) for v in HEADLINE_ORDER}
        ap = g["ap_recommended"]  # the product's default; no choice made on the test split
        vps = [x for x in (g["vp_pad"], g["vp_additive"]) if x is not None]
        if ap is not None and vps:
            beats_vp.append((f"{bb}/{ds}", ap > max(vps)))
        if ap is not None and g["linear"] is not None:
            beats_lin.append((f"{bb}/{ds}", ap > g["linear"]))
        if g["deep_ap"] is not None and g["norm"] is not None:
            deep_norm.append((f"{bb}/{ds}", g["deep_ap"] > g["norm"]))
    for label, results in (
        ("AP (recommended layer) beats VP (better of pad / additive) on every backbone/dataset", beats_vp),
        ("AP (recommended layer) beats the linear probe on every backbone/dataset", beats_lin),
        ("deep AP beats norm-tune on every backbone/dataset", deep_norm),
    ):
        if results:
            failed = [name for name, ok in results if not ok]
            checks.append(
                (
                    label,
                    not failed,
                    "fails on " + ", ".join(failed) if failed else f"{len(results)}/{len(results)}",
                )
            )
    return checks


def sweep_section(acc: dict[str, Any], out_dir: Path, catalogs: dict[str, Any]) -> str:
    sweeps: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in acc.get("results", []):
        if r.get("role") == "sweep":
            sweeps[r["backbone"]][r["dataset"]][int(r["prompt_layer"])] = r
    parts = []
    rows = []
    for bb, by_ds in sweeps.items():
        fig, ax = plt.subplots(figsize=(8, 4.2))
        all_layers: set[int] = set()
        for ds, layer_rows in by_ds.items():
            layers = sorted(layer_rows)
            all_layers.update(layers)
            ax.plot(
                layers,
                [100 * layer_rows[i]["test_accuracy"] for i in layers],
                marker="o",
                label=DATASET_LABELS.get(ds, ds),
            )
            ap_layers = [i for i in layers if i != 0]
            if not ap_layers:
                continue
            best_test = max(ap_layers, key=lambda i: layer_rows[i]["test_accuracy"])
            best_val = max(ap_layers, key=lambda i: layer_rows[i]["val_accuracy"])
            last = max(layers)
            where = "late" if best_test > 2 * last / 3 else "middle" if best_test > last / 3 else "early"
            rows.append(
                [
                    bb,
                    DATASET_LABELS.get(ds, ds),
                    f"{best_test} ({where}, of 0..{last})",
                    pct(layer_rows[best_test]["test_accuracy"]),
                    best_val,
                    pct(layer_rows[0]["test_accuracy"]) if 0 in layer_rows else "n/a",
                ]
            )
        cat = catalogs.get(bb)
        rec = cat.get("recommended_layer") if cat else None
        if rec is not None:
            ax.axvline(rec, color="grey", linestyle=":", label=f"recommended ({rec})")
        names = {layer["index"]: layer["name"] for layer in cat["layers"]} if cat else {}
        ticks = sorted(all_layers)
        ax.set_xticks(ticks)
        ax.set_xticklabels(
            [f"{i} {names.get(i, '')}".strip() for i in ticks], rotation=60, ha="right", fontsize=7
        )
        ax.set_xlabel("prompt layer (0 = input image, i.e. additive VP)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"AP layer sweep: {bb}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = f"sweep_{bb}.png"
        fig.savefig(out_dir / png, dpi=110)
        plt.close(fig)
        parts.append(f"![layer sweep {bb}]({png})")
    table = md_table(
        ["backbone", "dataset", "best layer (test)", "its test %", "best layer (val)", "layer 0 (VP add.) %"],
        rows,
    )
    return table + "\n\n" + "\n\n".join(parts)


def auto_section(acc: dict[str, Any]) -> str:
    autos = acc.get("auto", [])
    if not autos:
        return "No auto-layer results."
    rows, ok, frac = [], [], []
    full_runs = {
        (r["backbone"], r["dataset"]): r["wall_seconds"]
        for r in acc.get("results", [])
        if r.get("role") == "headline" and r["variant"] == "ap_recommended" and r["seed"] == 0
    }
    for a in autos:
        if "error" not in a and not a.get("cost_fraction") and (a["backbone"], a["dataset"]) in full_runs:
            a = {**a, "cost_fraction": a["auto_seconds"] / full_runs[(a["backbone"], a["dataset"])]}
        if "error" in a:
            rows.append([a["backbone"], a["dataset"], "error: " + a["error"], "", "", "", ""])
            continue
        rows.append(
            [
                a["backbone"],
                a["dataset"],
                a["auto_layer"],
                pct(a["auto_layer_sweep_test"]),
                f"{a['sweep_best_layer']} ({pct(a['sweep_best_test'])})",
                a["within_1_point"],
                f"{a['auto_seconds']:.0f} s ({a['cost_fraction']:.2f}×)"
                if a.get("cost_fraction")
                else f"{a['auto_seconds']:.0f} s",
            ]
        )
        if a["within_1_point"] is not None:
            ok.append(a["within_1_point"])
        if a.get("cost_fraction"):
            frac.append(a["cost_fraction"])
    summary = ""
    if ok:
        summary = f"\n\nAuto is within 1 point of the sweep's best layer in **{sum(ok)}/{len(ok)}** cases"
        if frac:
            lo, hi, avg = min(frac), max(frac), sum(frac) / len(frac)
            summary += f"; its cost is {lo:.2f}–{hi:.2f}× one full AP training run (mean {avg:.2f}×)"
        summary += "."
    rerun = acc.get("auto_rerun")
    if rerun:
        before = [
            a["within_1_point"] for a in rerun.get("previous_auto", []) if a.get("within_1_point") is not None
        ]
        summary += (
            f" These rows were re-measured after a change to the search ({rerun['note'].split(';')[0]}); "
            f"before it, auto was within 1 point in {sum(before)}/{len(before)} cases. The cost ratios "
            "divide by full-run times measured earlier on a more loaded machine, so they flatter the rerun."
        )
    heads = [
        "backbone",
        "dataset",
        "auto layer",
        "sweep test % at it",
        "sweep best (test %)",
        "within 1 pt",
        "auto cost (× full run)",
    ]
    return md_table(heads, rows) + summary


def cost_section(
    cost: dict[str, Any], out_dir: Path, tag: str = ""
) -> tuple[str, list[tuple[str, bool | None, str]]]:
    rows_by_bb: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in cost.get("results", []):
        rows_by_bb[r["backbone"]].append(r)
    catalogs = cost.get("catalogs", {})
    parts, checks = [], []
    goals = cost.get("goals", {"step_ratio": 0.35, "memory_ratio": 0.5, "cache_ratio": 0.2})
    for bb, rows in rows_by_bb.items():
        rec = catalogs.get(bb, {}).get("recommended_layer")
        names = {layer["index"]: layer["name"] for layer in catalogs.get(bb, {}).get("layers", [])}
        table = []
        for r in rows:
            what = r["method"]
            if r["method"] == "input":
                what = f"VP ({r.get('input_variant')})"
            elif r["method"] == "activation":
                layer = r["prompt_layer"]
                label = "every block" if layer == "all" else f"{layer} {names.get(layer, '')}"
                shape = " (channel)" if r.get("prompt_shape") == "channel" else ""
                what = f"AP {label}{shape}{' ★' if layer == rec else ''}"
            if "error" in r:
                table.append([what, "error: " + r["error"], "", "", "", "", "", ""])
                continue
            cpu = "step_cpu_seconds" in r and r.get("device", "cpu") == "cpu"
            table.append(
                [
                    what,
                    f"{r['step_seconds'] * 1000:.0f} ms",
                    f"{r['step_cpu_seconds'] * 1000:.0f} ms" if cpu else "",
                    f"{r.get('step_ratio_to_vp', float('nan')):.2f}",
                    "(same step)"
                    if r.get("first_layer") == 0
                    else f"{r.get('cached_step_ratio_to_vp', float('nan')):.2f}",
                    fmt_bytes(r["peak_memory_bytes"]),
                    f"{r['memory_ratio_to_vp']:.2f}" if r.get("memory_ratio_to_vp") is not None else "n/a",
                    fmt_params(r["trainable_params"]),
                ]
            )
        first = rows[0]
        head = f"#### {bb} ({first['input_size'][0]} px, batch {first['batch_size']}, {first['device']}{tag})"
        parts.append(
            head
            + "\n\n"
            + md_table(
                [
                    "configuration",
                    "step, wall",
                    "step, CPU time",
                    "step × VP",
                    "step × VP, prefix cached",
                    "peak memory",
                    "memory × VP",
                    "trainable",
                ],
                table,
            )
        )
        ap_rows = [
            r
            for r in rows
            if r["method"] == "activation"
            and isinstance(r["prompt_layer"], int)
            and r.get("prompt_shape") == "full"
            and "error" not in r
            and "step_ratio_to_vp" in r
        ]
        if ap_rows:
            fig, ax = plt.subplots(figsize=(7, 3.6))
            xs = [r["prompt_layer"] for r in ap_rows]
            ax.plot(
                xs,
                [r["step_ratio_to_vp"] for r in ap_rows],
                marker="o",
                label="step time × VP (prefix recomputed)",
            )
            ax.plot(
                xs,
                [r["cached_step_ratio_to_vp"] for r in ap_rows],
                marker="^",
                label="step time × VP (prefix cached)",
            )
            ax.plot(xs, [r["memory_ratio_to_vp"] or 0 for r in ap_rows], marker="s", label="peak memory × VP")
            ax.axhline(goals["step_ratio"], color="tab:blue", linestyle=":", linewidth=1)
            ax.axhline(goals["memory_ratio"], color="tab:green", linestyle=":", linewidth=1)
            if rec is not None:
                ax.axvline(rec, color="grey", linestyle="--", linewidth=1, label=f"recommended ({rec})")
            ax.set_xlabel("AP layer")
            ax.set_ylabel("ratio to VP")
            ax.set_title(f"Training cost of AP by layer: {bb}{tag}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            png = f"cost_{bb}{tag.replace(' ', '_').replace(',', '')}.png"
            fig.savefig(out_dir / png, dpi=110)
            plt.close(fig)
            parts.append(f"![cost {bb}]({png})")
        fam_cnn = not bb.startswith("vit")
        rec_row = next((r for r in ap_rows if r["prompt_layer"] == rec), None)
        if fam_cnn and rec_row is not None:
            s_cached, s_full = rec_row["cached_step_ratio_to_vp"], rec_row["step_ratio_to_vp"]
            m = rec_row.get("memory_ratio_to_vp")
            goal = goals["step_ratio"]
            checks.append(
                (
                    f"{bb}{tag}: AP at the recommended layer {rec}, step ≤ {goal}× VP "
                    "(steady state: prefix from the feature cache)",
                    s_cached <= goal,
                    f"{s_cached:.2f}×",
                )
            )
            checks.append(
                (
                    f"{bb}{tag}: AP at layer {rec}, step ≤ {goal}× VP with the prefix recomputed every step "
                    "(epoch 1, or with augmentation)",
                    s_full <= goal,
                    f"{s_full:.2f}×",
                )
            )
            if m is not None:
                checks.append(
                    (
                        f"{bb}{tag}: AP at layer {rec}, peak memory ≤ {goals['memory_ratio']}× VP",
                        m <= goals["memory_ratio"],
                        f"{m:.2f}×",
                    )
                )
    fc = cost.get("feature_cache")
    if fc:
        fc_rows = [
            [
                f"{r['backbone']} AP {r['label']} ({r['prompt_layer']})",
                r["n_images"],
                f"{r['first_epoch_seconds']:.2f}",
                f"{r['later_epoch_seconds']:.2f}",
                f"{r.get('first_epoch_cpu_seconds', float('nan')):.2f}",
                f"{r.get('later_epoch_cpu_seconds', float('nan')):.2f}",
                f"{r['ratio']:.2f}",
                fmt_bytes(r["cache_bytes"]),
            ]
            for r in fc.get("runs", [])
        ]
        parts.append(
            "#### Feature cache (fit(), real GTSRB images, no augmentation)\n\n"
            + md_table(
                [
                    "prompt",
                    "images",
                    "epoch 1 (fills cache), wall s",
                    "later epochs, wall s",
                    "epoch 1, CPU s",
                    "later epochs, CPU s",
                    "ratio (CPU time on CPU)",
                    "cache size",
                ],
                fc_rows,
            )
        )
        checks.append(
            (
                f"feature cache: later epochs ≤ {goals['cache_ratio']}× epoch 1 (AP, recommended layer)",
                fc["ratio"] <= goals["cache_ratio"],
                f"{fc['ratio']:.3f}× (last block: {fc['runs'][1]['ratio']:.3f}×)"
                if len(fc.get("runs", [])) > 1
                else f"{fc['ratio']:.3f}×",
            )
        )
    return "\n\n".join(parts), checks


def caveats(acc: dict[str, Any]) -> list[str]:
    """What limits the conclusions, derived from the run itself where possible."""
    budget = acc["budget"]
    steps = budget["epochs"] * -(-budget["n_train"] // budget["batch_size"])
    out = [
        f"Small budgets (a shared 2-core CPU): {budget['n_train']} training images and {budget['epochs']} "
        f"epochs = {steps} optimizer steps per run. Absolute accuracies are therefore far below a long run "
        "(issue 2's reference: 8,000 images, 10 epochs); the comparisons between methods at an equal "
        "budget are the point."
    ]
    if "tinyimagenet" in budget["datasets"]:
        per_class = budget["n_train"] // 200
        out.append(
            f"Tiny-ImageNet-200 gets about {per_class} training images per class at this budget: every "
            "method "
            "stays within a few points of chance (0.5 %), so its rows say little either way."
        )
    searched = {k for k, v in budget["backbones"].items() if v.get("lr_search", True)}
    pairs = [
        (v, x)
        for bb, d in acc.get("lr", {}).items()
        if bb in searched
        for v, x in d.items()
        if v != "ap_best"
    ]
    edge = [v for v, x in pairs if x >= (1e-3 if v == "full" else 0.03)]
    if edge:
        out.append(
            f"The chosen learning rate sits at the top of its grid for {len(edge)} of {len(pairs)} methods: "
            "with so few steps large steps win, and a wider grid could lift every method."
        )
    out.append(
        "Full fine-tuning at this budget is not a real ceiling (too few steps to move 0.27M weights far); "
        "deep AP can and does exceed it here."
    )
    single = [k for k, v in budget["backbones"].items() if len(v["seeds"]) == 1]
    if single:
        out.append(
            f"{', '.join(single)}: one seed (no ± shown), learning rates transferred from the first backbone."
        )
    if acc.get("parallel_process"):
        pp = acc["parallel_process"]
        out.append(
            f"{', '.join(pp['backbones'])} ran in a second process beside the main one (same code and plan, "
            f"{pp['elapsed_seconds'] / 60:.0f} min wall, {pp['cpu_seconds'] / 60:.0f} min CPU) and was "
            "merged in."
        )
    cpu = acc.get("cpu_seconds", 0) + (acc.get("parallel_process") or {}).get("cpu_seconds", 0)
    out.append(f"Accuracy CPU time in total: {cpu / 60:.0f} min.")
    out.append(
        "VP (padding) trainable counts are the engine's: the padding prompt is stored as a full 3×H×W "
        "tensor, masked to the frame, so the count overstates the frame's free pixels."
    )
    return out


def build(out_dir: Path) -> Path:
    acc = read_json(out_dir / "accuracy.json") or {}
    cost = read_json(out_dir / "training_cost.json") or {}
    gpu_cost = read_json(out_dir / "gpu" / "training_cost.json")
    lines = ["# actprompt benchmarks", ""]
    machine = acc.get("machine") or cost.get("machine") or {}
    m = machine
    cpu = m.get("cpu_model", m.get("device_name", "?"))
    lines.append(
        f"Measured {m.get('timestamp', '?')} on {cpu}, {m.get('cpu_count', '?')} CPU cores, "
        f"{m.get('torch_threads', '?')} torch threads, torch {m.get('torch', '?')}, "
        f"timm {m.get('timm', '?')}. "
        "The machine was shared with other jobs, so absolute times are noisy; every ratio compares "
        "configurations measured in the same run."
    )
    budget = acc.get("budget")
    if budget:
        lr_text = (
            "a grid (head / prompt / norm methods: 1e-2, 3e-2, plus 3e-3 for the cheap ones; "
            "full fine-tuning: 3e-4, 1e-3)"
            if budget.get("lr_grid")
            else "a single value (1e-2; full fine-tuning 3e-4)"
        )
        first = budget["datasets"][0]
        seeds = ", ".join(f"{k} {len(v['seeds'])}" for k, v in budget["backbones"].items())
        transferred = [k for k, v in budget["backbones"].items() if not v.get("lr_search", True)]
        acc_min = acc.get("elapsed_seconds", 0) / 60
        cost_min = cost.get("total_seconds", 0) / 60
        lines += [
            "",
            "## Budget",
            "",
            f"Plan **{budget['name']}**: per dataset a fixed random subset of {budget['n_train']} "
            f"training images (+{budget['n_val']} validation images, stratified, used to choose the "
            f"learning rate and the best layer) and {budget['n_test']} test images; {budget['epochs']} "
            f"epochs, batch {budget['batch_size']}, "
            "AdamW, cosine schedule, no augmentation (so the feature cache is on). Layer sweep: "
            f"{budget['sweep_n_train']} training images, {budget['sweep_epochs']} epochs, seed 0. "
            f"Learning rate per method from {lr_text}, chosen on the validation split of "
            f"{DATASET_LABELS.get(first, first)} at "
            "seed 0 and reused for the other datasets"
            + (
                f" (and transferred from the first backbone to {', '.join(transferred)})"
                if transferred
                else ""
            )
            + f". Seeds per backbone: {seeds}. Wall time: accuracy {acc_min:.0f} min, training cost "
            f"{cost_min:.0f} min.",
        ]
        missing = missing_headline(acc)
        if missing or acc.get("complete") is False:
            lines += [
                "",
                f"**Incomplete:** the accuracy run stopped at its time budget (`--max-minutes`) after "
                f"{len(acc.get('results', []))} recorded runs; `make bench` resumes where it stopped. "
                f"Headline runs still missing: {', '.join(missing[:12]) or 'none'}"
                + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
                + ".",
            ]
        lr = acc.get("lr", {})
        if lr:
            chosen = "; ".join(
                f"{bb}: " + ", ".join(f"{v} {x:g}" for v, x in d.items()) for bb, d in lr.items()
            )
            lines += ["", "Chosen learning rates: " + chosen]
    checks: list[tuple[str, bool | None, str]] = []
    body: list[str] = []
    if budget:
        lines += ["", "## Reading these numbers", "", *[f"- {c}" for c in caveats(acc)]]
    if acc.get("results"):
        table, findings = headline_tables(acc)
        body += ["## Accuracy (test %, mean ± std over seeds; trainable parameters)", "", table, ""]
        if findings:
            body += ["In numbers:", "", *[f"- {f}" for f in findings], ""]
        body += [
            "## Layer sweep (AP at one layer, seed 0, sweep budget)",
            "",
            sweep_section(acc, out_dir, cost.get("catalogs", {}) | acc.get("catalogs", {})),
            "",
        ]
        body += ["## Auto layer", "", auto_section(acc), ""]
        checks += accuracy_goals(acc)
    if cost.get("results"):
        text, c = cost_section(cost, out_dir)
        body += [
            "## Training cost",
            "",
            "Step = one training step (forward, backward, AdamW) on a random batch, median of the timed "
            'steps; it includes the no-grad forward up to the prompt. "Prefix cached" reads that '
            "activation from the feature cache instead (epochs after the first). Ratios to VP use the "
            "process CPU time on the CPU (one torch thread; the wall clock on a shared machine measures the "
            "neighbours too) and the wall clock on CUDA. Peak memory: CPU = the process's resident "
            "high-water mark above what was resident before the steps, each configuration in a fresh "
            "subprocess; CUDA = "
            "`torch.cuda.max_memory_allocated` above the allocation before the steps. ★ = recommended layer.",
            "",
            text,
            "",
        ]
        checks += c
    if (out_dir / "serving.md").exists():
        body += ["## Serving", "", "Written by `bench/serving.py`: see [serving.md](serving.md).", ""]
    if gpu_cost and gpu_cost.get("results"):
        text, c = cost_section(gpu_cost, out_dir, tag=", GPU")
        body += ["## Training cost on GPU", "", text, ""]
        checks += c
    else:
        body += [
            "## GPU",
            "",
            "No GPU results in this run (`bench/gpu.sh` is the prepared script for a session that has one).",
            "",
        ]
    if checks:
        lines += [
            "",
            "## Goals (DESIGN.md §6)",
            "",
            md_table(
                ["goal", "met", "measured"],
                [
                    [label, {True: "yes", False: "**no**", None: "n/a"}[ok], detail]
                    for label, ok, detail in checks
                ],
            ),
        ]
    lines += ["", *body]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    print(build(args.out or results_dir(args.quick)))


if __name__ == "__main__":
    main()
