# ruff: noqa: RUF001 (the report text uses the multiplication sign and the en dash on purpose)
"""Turn the benchmark JSON into ``REPORT.md`` and its plots (also alone: ``python -m bench.report``).

Every sentence with a number is computed here from the JSON; nothing is claimed that the data does not
say (a comparison reads "higher" / "lower" / "within noise" by the numbers of that run).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bench.accuracy import PLANS, SERVABLE, VARIANT_LABELS
from bench.common import fmt_bytes, fmt_params, md_table, mean_std, read_json, results_dir

DATASET_LABELS = {
    "gtsrb": "GTSRB-43",
    "tinyimagenet": "Tiny-ImageNet-200 (32 px)",
    "tinyimagenet20": "Tiny-ImageNet, 20 classes (32 px)",
    "mnist": "MNIST",
}
AP_VARIANTS = ("ap", "ap_channel", "deep_ap", "deep_ap_norm")
#: An external reference run quoted in bench/GOALS.md (ResNet-20 -> GTSRB-43, 8,000 / 4,000 images, 10 epochs,
#: Adam + cosine, batch 128): what our numbers are checked against, not a result of this project.
CALIBRATION = {
    "resnet20_cifar/gtsrb": {
        "linear": 51.2,
        "vp_additive": 59.8,
        "ap": 72.8,
        "norm": 81.7,
        "deep_ap": 85.8,
        "deep_ap_norm": 91.5,
        "lora_r4": 94.6,
        "lora_r16": 93.0,
        "full": 97.7,
    },
    "vit_cifar10_p4_d128_l6/gtsrb": {
        "lora_r4": 76.5,
        "deep_ap_norm": 75.0,
        "deep_ap": 70.7,
        "ap": 66.0,
        "vp_additive": 56.8,
        "linear": 40.3,
    },
}
Check = tuple[str, bool | None, str]


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _groups(acc: dict[str, Any]) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    out: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in acc.get("results", []):
        out.setdefault((r["backbone"], r["dataset"]), {}).setdefault(r["variant"], []).append(r)
    return out


def _stat(runs: list[dict[str, Any]], key: str = "test_accuracy") -> tuple[float, float]:
    return mean_std([float(r[key]) for r in runs])


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """'higher' / 'lower' / 'within noise': a difference smaller than the larger seed std (or 0.5 point
    with one seed) is not called a difference."""
    (ma, sa), (mb, sb) = _stat(a), _stat(b)
    noise = max(sa, sb, 0.005)
    if abs(ma - mb) <= noise:
        return "within noise of"
    return "above" if ma > mb else "below"


def accuracy_tables(acc: dict[str, Any]) -> str:
    """One table per backbone: per dataset and method, test mean ± std, params, time, memory, servable."""
    groups = _groups(acc)
    out = []
    for bb in dict.fromkeys(k[0] for k in groups):
        for (b2, ds), by_variant in groups.items():
            if b2 != bb:
                continue
            rows = []
            for variant, runs in by_variant.items():
                m, s = _stat(runs)
                layer = runs[0]["prompt_layer"]
                at = f" @{layer}" if variant in ("ap", "ap_channel") else ""
                rows.append(
                    [
                        VARIANT_LABELS.get(variant, variant) + at,
                        f"{100 * m:.1f} ± {100 * s:.1f}" if len(runs) > 1 else f"{100 * m:.1f}",
                        len(runs),
                        f"{100 * _stat(runs, 'val_accuracy')[0]:.1f}",
                        fmt_params(runs[0]["trainable_params"]),
                        f"{_stat(runs, 'train_seconds')[0]:.1f} s",
                        fmt_bytes(max(r["peak_memory_bytes"] for r in runs)),
                        "yes" if variant in SERVABLE else "no",
                        f"{runs[0]['lr']:g}",
                        " ".join(f"{x:g}" for x in runs[0]["lr_grid"]),
                    ]
                )
            first = next(iter(by_variant.values()))[0]
            out.append(
                f"### {bb} → {DATASET_LABELS.get(ds, ds)} ({first['train_images']} training images, "
                f"{first['epochs']} epochs)\n\n"
                + md_table(
                    [
                        "method",
                        "test %",
                        "seeds",
                        "val %",
                        "trainable",
                        "train time",
                        "peak memory",
                        "servable (mixed batch)",
                        "lr",
                        "lr grid",
                    ],
                    rows,
                )
            )
    return "\n\n".join(out)


def findings(acc: dict[str, Any]) -> list[str]:
    """Comparisons a reader asks first, each stated from the numbers of this run."""
    lines = []
    for (bb, ds), g in _groups(acc).items():

        def m(v: str, g: dict[str, list[dict[str, Any]]] = g) -> str:
            return pct(_stat(g[v])[0])

        parts = []
        pairs = [
            ("ap", "vp_additive"),
            ("ap", "vp_pad"),
            ("ap", "linear"),
            ("deep_ap", "norm"),
            ("deep_ap_norm", "deep_ap"),
            ("deep_ap_norm", "lora_r4"),
            ("deep_ap_norm", "full"),
            ("lora_r4", "lora_r16"),
        ]
        for a, b in pairs:
            if a in g and b in g:
                parts.append(
                    f"{VARIANT_LABELS[a]} {m(a)} % is {compare(g[a], g[b])} {VARIANT_LABELS[b]} {m(b)} %"
                )
        if parts:
            lines.append(f"{bb} / {DATASET_LABELS.get(ds, ds)}: " + "; ".join(parts) + ".")
    return lines


def calibration_section(acc: dict[str, Any]) -> str:
    groups = _groups(acc)
    rows = []
    for scope, ref in CALIBRATION.items():
        bb, ds = scope.split("/")
        g = groups.get((bb, ds), {})
        for variant, value in ref.items():
            if variant in g:
                ours = 100 * _stat(g[variant])[0]
                rows.append(
                    [scope, VARIANT_LABELS[variant], f"{ours:.1f}", f"{value:.1f}", f"{ours - value:+.1f}"]
                )
    if not rows:
        return ""
    return md_table(["scope", "method", "this run, test %", "reference run, test %", "difference"], rows)


def _reference_scopes(acc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The reference-budget rows by scope (rows at another scope's val-chosen rate and layer)."""
    scopes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in acc.get("reference_budget") or []:
        scopes[r.get("scope", f"{r['backbone']}/{r['dataset']}")].append(r)
    return scopes


def reference_budget_section(acc: dict[str, Any]) -> list[str]:
    """One table per reference-budget scope."""
    return [line for rows in _reference_scopes(acc).values() for line in _reference_scope_section(rows)]


def _reference_scope_section(rows: list[dict[str, Any]]) -> list[str]:
    """A reference setting's table and what it says about the claim that matters most: LoRA against
    deep AP and deep AP + norm-tune."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["variant"]].append(r)
    r0 = rows[0]
    ref = CALIBRATION.get(f"{r0['backbone']}/{r0['dataset']}", {})
    table = []
    for variant, rs in sorted(by.items(), key=lambda kv: -_stat(kv[1])[0]):
        first = rs[0]
        ours, spread = (100 * x for x in _stat(rs))
        theirs = ref.get(variant)
        table.append(
            [
                VARIANT_LABELS[variant],
                f"{ours:.1f} ± {spread:.1f}" if len(rs) > 1 else f"{ours:.1f}",
                "n/a" if theirs is None else f"{theirs:.1f}",
                "n/a" if theirs is None else f"{ours - theirs:+.1f}",
                f"{first['lr']:g}",
                "—" if first["prompt_layer"] is None else str(first["prompt_layer"]),
                fmt_params(first["trainable_params"]),
                f"{_stat(rs, 'train_seconds')[0]:.0f}",
            ]
        )
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"### {r0['scope']}: the reference run's setting",
        "",
        f"{r0['train_images']} training images, {r0['epochs']} epochs, seed(s) {seeds}; every method at "
        f"the learning rate (and AP layer) that `{r0['settings_from']}` chose on validation at its smaller "
        "budget: nothing was tuned at this size, and nothing on test.",
        "",
        md_table(
            [
                "method",
                "test %" + (" (mean ± std)" if len(seeds) > 1 else ""),
                "reference % (seed 0)",
                "difference",
                "lr",
                "layer",
                "trainable",
                "train s" + (" (mean)" if len(seeds) > 1 else ""),
            ],
            table,
        ),
        "",
    ]
    mean = {v: 100 * _stat(rs)[0] for v, rs in by.items()}
    if {"lora_r4", "deep_ap", "deep_ap_norm"} <= set(mean):
        lead = mean["lora_r4"] - mean["deep_ap"]
        closed = mean["deep_ap_norm"] - mean["deep_ap"]
        share = f" ({100 * closed / lead:.0f} % of it)" if lead > 0 else ""
        ref_lead = ref.get("lora_r4", float("nan")) - ref.get("deep_ap", float("nan"))
        ref_text = f"reference: {ref_lead:+.1f}" if ref_lead == ref_lead else "no reference for deep AP"
        verdicts = (
            f" Over the seeds, LoRA r=4 is {compare(by['lora_r4'], by['deep_ap'])} deep AP, and deep AP + "
            f"norm-tune is {compare(by['deep_ap_norm'], by['lora_r4'])} LoRA r=4."
            if len(seeds) > 1
            else ""
        )
        lines += [
            f"LoRA r=4 is {lead:+.1f} points against deep AP here ({ref_text}); "
            f"deep AP + norm-tune moves deep AP by {closed:+.1f} points{share}.{verdicts}",
            "",
        ]
    return lines


def method_guidance(acc: dict[str, Any]) -> list[str]:
    """Which servable method to pick, read off each reference-budget scope: the most accurate one, and
    the cheaper ones with what they give up (points of test accuracy) and save (training time)."""
    lines: list[str] = []
    for scope, rows in _reference_scopes(acc).items():
        by: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r.get("servable"):
                by[r["variant"]].append(r)
        if not by:
            continue
        test = {v: 100 * _stat(rs)[0] for v, rs in by.items()}
        secs = {v: _stat(rs, "train_seconds")[0] for v, rs in by.items()}
        best = max(test, key=lambda v: test[v])
        others = sorted((v for v in test if v != best), key=lambda v: -test[v])
        cheaper = [
            f"{VARIANT_LABELS[v]} {test[v] - test[best]:+.1f} points at "
            f"{secs[v] / max(secs[best], 1e-9):.2f}× its training time"
            for v in others
        ]
        lines.append(
            f"- **{scope}**: {VARIANT_LABELS[best]} is the most accurate servable method "
            f"({test[best]:.1f} %, {secs[best]:.0f} s to train)"
            + (f"; against it, {'; '.join(cheaper)}." if cheaper else ".")
        )
    if not lines:
        return []
    return [
        "**Which method** (generated from the reference-budget rows; every one is served in the mixed pass, "
        'and `method: "auto"` trains AP at one layer, deep AP + norm-tune and LoRA r=4 and keeps the best '
        "on validation):",
        "",
        *lines,
        "",
    ]


def lr_section(acc: dict[str, Any]) -> str:
    grids = acc.get("lr_search", [])
    if not grids:
        return ""
    edge = [g for g in grids if g["at_edge"]]
    extended = [g for g in grids if len(g["lr_grid"]) > 1]
    text = (
        f"{len(grids)} learning-rate selections; {len(edge)} of them still chose an edge of the grid "
        "after the extensions the plan allows"
        + (": " + ", ".join(f"{g['backbone']}/{g['dataset']}/{g['variant']} ({g['lr']:g})" for g in edge))
        if edge
        else f"{len(grids)} learning-rate selections, none at an edge of its (extended) grid"
    )
    del extended
    single = [g for g in grids if len(g["lr_grid"]) == 1]
    if single:
        text += f" {len(single)} selections used a single rate, not tuned (plan: grid of 1): " + ", ".join(
            sorted({f"{g['backbone']}/{g['dataset']}" for g in single})
        )
    return text + "."


def sweep_section(acc: dict[str, Any]) -> str:
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in acc.get("sweep", []):
        by[(r["backbone"], r["dataset"])].append(r)
    rows = []
    for (bb, ds), rs in by.items():
        chosen = next(r for r in rs if r.get("chosen"))
        best_test = max(rs, key=lambda r: r["test_accuracy"])
        n = len(acc.get("catalogs", {}).get(bb, {}).get("layers", [])) - 1
        rows.append(
            [
                bb,
                DATASET_LABELS.get(ds, ds),
                f"{chosen['prompt_layer']} of 1..{n}",
                pct(chosen["val_accuracy"]),
                pct(chosen["test_accuracy"]),
                f"{best_test['prompt_layer']} ({pct(best_test['test_accuracy'])})",
            ]
        )
    table = md_table(
        [
            "backbone",
            "dataset",
            "layer chosen on validation",
            "its val %",
            "its test %",
            "best test layer (shown only)",
        ],
        rows,
    )
    plots = "\n\n".join(f"![layer sweep {bb}](sweep_{bb}.png)" for bb in dict.fromkeys(k[0] for k in by))
    return table + "\n\n" + plots


def accuracy_goals(acc: dict[str, Any]) -> list[Check]:
    """The accuracy goals of bench/GOALS.md, per backbone."""
    checks: list[Check] = []
    per_bb: dict[str, dict[str, list[tuple[str, bool]]]] = defaultdict(lambda: defaultdict(list))
    lora_notes: dict[str, list[str]] = defaultdict(list)
    for (bb, ds), g in _groups(acc).items():
        name = f"{ds}"
        mean = {v: _stat(r)[0] for v, r in g.items()}
        vps = [mean[v] for v in ("vp_pad", "vp_additive") if v in mean]
        if "ap" in mean and vps:
            per_bb[bb]["AP (val-chosen layer) beats VP (better of pad / additive)"].append(
                (name, mean["ap"] > max(vps))
            )
        if "ap" in mean and "linear" in mean:
            per_bb[bb]["AP (val-chosen layer) beats the linear probe"].append(
                (name, mean["ap"] > mean["linear"])
            )
        if "deep_ap" in mean and "norm" in mean:
            per_bb[bb]["deep AP beats norm-tune"].append((name, mean["deep_ap"] > mean["norm"]))
        aps = [v for v in AP_VARIANTS if v in g]
        loras = [v for v in ("lora_r4", "lora_r16") if v in g]
        if aps and loras:
            best_ap = max(aps, key=lambda v: _stat(g[v], "val_accuracy")[0])
            best_lora = max(loras, key=lambda v: _stat(g[v], "val_accuracy")[0])
            gap = mean[best_lora] - mean[best_ap]
            t_ap, t_lora = _stat(g[best_ap], "train_seconds")[0], _stat(g[best_lora], "train_seconds")[0]
            ok = gap <= 0.02 and t_ap <= 0.5 * t_lora
            per_bb[bb][
                "best AP (chosen on validation) within 2 points of LoRA at ≤ ½ its training time"
            ].append((name, ok))
            lora_notes[bb].append(
                f"{ds}: {VARIANT_LABELS[best_ap]} {pct(mean[best_ap])} vs {VARIANT_LABELS[best_lora]} "
                f"{pct(mean[best_lora])} ({100 * gap:+.1f} pt), time {t_ap / max(t_lora, 1e-9):.2f}×"
            )
            if "full" in mean and "norm" in mean:
                ok2 = (mean["full"] - mean[best_ap]) <= 0.5 * (mean["full"] - mean["norm"])
                per_bb[bb]["gap to full fine-tuning ≤ ½ of norm-tune's"].append((name, ok2))
    for bb, goals in per_bb.items():
        for label, results in goals.items():
            failed = [n for n, ok in results if not ok]
            detail = f"{len(results) - len(failed)}/{len(results)} datasets"
            if failed:
                detail += "; fails on " + ", ".join(failed)
            if label.startswith("best AP") and lora_notes[bb]:
                detail += " (" + "; ".join(lora_notes[bb]) + ")"
            checks.append((f"{bb}: {label}", not failed, detail))
    return checks


def serving_goals(serving: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    for bb, r in (serving.get("backbones") or {}).items():
        e = r.get("engine") or {}
        c = e.get("comparisons") or {}
        if not c:
            continue
        single = c["mixed_vs_single_prompt_module"]
        bank_one = c["mixed_vs_bank_one_prompt"]
        bare = c["mixed_vs_bare"]
        naive = c["mixed_vs_one_pass_per_prompt"]

        def met(cmp: dict[str, Any], goal: float) -> bool:
            return bool(cmp["ratio"] >= goal or cmp["verdict"] == "no difference")

        checks += [
            (
                f"{bb}: mixed batch ≥ 0.95× one prompt (batch {e['batch']})",
                met(single, 0.95) and met(bank_one, 0.95),
                f"{single['ratio']:.2f}× a single prompt module ({single['verdict']}), "
                f"{bank_one['ratio']:.2f}× the bank with one prompt ({bank_one['verdict']})",
            ),
            (
                f"{bb}: mixed batch ≥ 0.9× the bare backbone",
                met(bare, 0.9),
                f"{bare['ratio']:.2f}× ({bare['verdict']})",
            ),
            (f"{bb}: ≥ 10× one pass per prompt", naive["ratio"] >= 10, f"{naive['ratio']:.1f}×"),
        ]
    scale = (serving.get("backbones") or {}).get("resnet20_cifar", {}).get("scale")
    if scale:
        checks.append(
            (
                "resnet20_cifar: prompts behind a bounded cache, zero failures, cold load p95 reported",
                scale.get("failures") == 0,
                f"{scale.get('prompts')} prompts, {scale.get('failures')} failures, "
                f"cold load p95 {scale.get('cold_load_p95_ms')} ms",
            )
        )
    http = serving.get("http_vs_engine")
    if isinstance(http, dict) and http:
        checks.append(("HTTP images/s vs the bare engine (bench/serving_http.py)", None, _flat(http)))
    return checks


def _flat(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if isinstance(v, int | float | str))[:400]


def budget_section(acc: dict[str, Any], cost: dict[str, Any]) -> list[str]:
    budget = acc.get("budget") or {}
    prov = acc.get("provenance") or {}
    rows = [
        [
            f"{s['backbone']}/{s['dataset']}" + (f" ({s['tag']})" if s.get("tag") else ""),
            s["n_train"],
            s["n_val"],
            s["n_test"],
            s["epochs"],
            s["batch_size"],
            len(s["seeds"]),
            f"from {s['settings_from']}" if s.get("settings_from") else s["grid_points"],
            "from the same"
            if s.get("settings_from")
            else ("every layer" if s["sweep_stride"] <= 1 else f"every {s['sweep_stride']}th"),
            len(s["variants"]),
        ]
        for s in budget.get("scopes", [])
    ]
    lines = [
        f"Plan **{budget.get('plan', '?')}** ({budget.get('note', '')}). Optimizer for every method: "
        f"{budget.get('optimizer', '?')}. Every method in one scope sees the same images, epochs and seeds; "
        "the validation split (stratified, carved from the training images) chooses the learning rate and "
        "the AP layer; the test split chooses nothing.",
        "",
        md_table(
            [
                "scope",
                "train",
                "val",
                "test",
                "epochs",
                "batch",
                "seeds",
                "initial lr grid",
                "AP sweep",
                "methods",
            ],
            rows,
        ),
        "",
        f"Wall time: accuracy {float(prov.get('wall_seconds', 0)) / 60:.1f} min with {prov.get('jobs', '?')} "
        f"worker processes ({float(prov.get('cpu_seconds_main', 0)) / 60:.1f} CPU-min in total); "
        f"training cost {float(cost.get('total_seconds', 0)) / 60:.1f} min.",
    ]
    est = full_budget_estimate(acc)
    if est:
        lines += ["", est]
    return lines


def plan_cpu_seconds(acc: dict[str, Any], plan_name: str) -> tuple[float, set[str]]:
    """Training CPU-seconds a plan needs, from this run's measured seconds per (image x epoch) per
    (backbone, method), with the typical run count (grid + one extension, plus the extra seeds, plus the
    sweep). Backbones this run did not measure are returned as missing."""
    rate: dict[tuple[str, str], float] = {}
    for r in [*acc.get("results", []), *acc.get("sweep", [])]:
        per = r["train_seconds"] / max(1, r["train_images"] * r["epochs"])
        rate.setdefault((r["backbone"], r.get("variant", "ap")), per)
    total, missing = 0.0, set()
    for s in PLANS[plan_name].scopes:
        grid_runs = s.grid_points + (1 if s.grid_points > 1 else 0)
        for v in s.variants:
            r = rate.get((s.backbone, v)) or rate.get((s.backbone, "ap" if v.startswith("ap") else v))
            if r is None:
                missing.add(f"{s.backbone}/{v}")
                continue
            total += r * s.n_train * s.epochs * (grid_runs + len(s.seeds) - 1)
        sweep = rate.get((s.backbone, "ap"))
        if sweep is not None and ("ap" in s.variants):
            n_layers = len(acc.get("catalogs", {}).get(s.backbone, {}).get("layers", [])) or 10
            total += sweep * s.n_train * s.epochs * (n_layers / max(1, s.sweep_stride))
    return total, missing


def full_budget_estimate(acc: dict[str, Any]) -> str:
    """CPU-hours of `--budget full`, from this run's measured seconds per image-epoch."""
    if not acc.get("results"):
        return ""
    total, missing = plan_cpu_seconds(acc, "full")
    note = f" (not counted, no measurement: {', '.join(sorted(missing)[:6])})" if missing else ""
    return (
        f"Estimated cost of `make bench BUDGET=full` (the full budget) from the seconds per image-epoch "
        f"measured in this run: about **{total / 3600:.0f} CPU-hours** of training{note}, i.e. "
        f"{total / 3600 / 2:.0f} h wall on 2 cores; not run here."
    )


_COST_HEADERS = [
    "configuration",
    "step, wall",
    "step, CPU time",
    "step × VP",
    "step × VP, prefix cached",
    "peak memory",
    "memory × VP",
    "peak memory, prefix cached (incl. the cache)",
    "trainable",
]


def _cost_label(r: dict[str, Any], names: dict[int, str], rec: Any) -> str:
    """How a training-cost row names its configuration."""
    if r["method"] == "input":
        return f"VP ({r.get('input_variant')})"
    if r["method"] == "lora":
        return f"LoRA r={r.get('lora_rank')} (peft)"
    if r["method"] == "deep_activation_norm":
        return "deep AP + norm-tune"
    if r["method"] == "activation":
        layer = r["prompt_layer"]
        label = "every block" if layer == "all" else f"{layer} {names.get(layer, '')}"
        shape = " (channel)" if r.get("prompt_shape") == "channel" else ""
        return f"AP {label}{shape}{' ★' if layer == rec else ''}"
    return str(r["method"])


def _cost_row(r: dict[str, Any], what: str) -> list[Any]:
    if "error" in r:
        return [what, "error: " + r["error"], "", "", "", "", "", "", ""]
    cpu = "step_cpu_seconds" in r and r.get("device", "cpu") == "cpu"
    return [
        what,
        f"{r['step_seconds'] * 1000:.0f} ms",
        f"{r['step_cpu_seconds'] * 1000:.0f} ms" if cpu else "",
        f"{r.get('step_ratio_to_vp', float('nan')):.2f}",
        "(same step)"
        if r.get("first_layer") == 0
        else f"{r.get('cached_step_ratio_to_vp', float('nan')):.2f}",
        fmt_bytes(r["peak_memory_bytes"]),
        f"{r['memory_ratio_to_vp']:.2f}" if r.get("memory_ratio_to_vp") is not None else "n/a",
        (
            f"{fmt_bytes(r['cached_peak_memory_bytes'])} "
            f"(cache {fmt_bytes(r.get('feature_cache_bytes'))}, {r.get('cache_images')} img)"
        )
        if "cached_peak_memory_bytes" in r
        else "n/a",
        fmt_params(r["trainable_params"]),
    ]


def _cost_plot(
    ap_rows: list[dict[str, Any]], bb: str, rec: Any, goals: dict[str, float], out_dir: Path, tag: str
) -> str:
    """AP's step-time and memory ratios to VP by layer, as a PNG beside the report; returns its name."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = [r["prompt_layer"] for r in ap_rows]
    ax.plot(
        xs, [r["step_ratio_to_vp"] for r in ap_rows], marker="o", label="step time × VP (prefix recomputed)"
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
    return png


def _cost_checks(
    rec_row: dict[str, Any], bb: str, rec: Any, goals: dict[str, float], tag: str
) -> list[Check]:
    """The training-cost goals of a CNN at its recommended layer."""
    s_cached, s_full = rec_row["cached_step_ratio_to_vp"], rec_row["step_ratio_to_vp"]
    m = rec_row.get("memory_ratio_to_vp")
    goal = goals["step_ratio"]
    checks: list[Check] = [
        (
            f"{bb}{tag}: AP at the recommended layer {rec}, step ≤ {goal}× VP "
            "(steady state: prefix from the feature cache)",
            s_cached <= goal,
            f"{s_cached:.2f}×",
        ),
        (
            f"{bb}{tag}: AP at layer {rec}, step ≤ {goal}× VP with the prefix recomputed every step "
            "(epoch 1, or with augmentation)",
            s_full <= goal,
            f"{s_full:.2f}×",
        ),
    ]
    if m is not None:
        checks.append(
            (
                f"{bb}{tag}: AP at layer {rec}, peak memory ≤ {goals['memory_ratio']}× VP",
                m <= goals["memory_ratio"],
                f"{m:.2f}×",
            )
        )
    return checks


def _feature_cache_part(fc: dict[str, Any], goals: dict[str, float]) -> tuple[str, Check]:
    """The feature-cache table and its goal (later epochs against the first)."""
    rows = [
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
    text = "#### Feature cache (fit(), real GTSRB images, no augmentation)\n\n" + md_table(
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
        rows,
    )
    check = (
        f"feature cache: later epochs ≤ {goals['cache_ratio']}× epoch 1 (AP, recommended layer)",
        fc["ratio"] <= goals["cache_ratio"],
        f"{fc['ratio']:.3f}× (last block: {fc['runs'][1]['ratio']:.3f}×)"
        if len(fc.get("runs", [])) > 1
        else f"{fc['ratio']:.3f}×",
    )
    return text, check


def cost_section(cost: dict[str, Any], out_dir: Path, tag: str = "") -> tuple[str, list[Check]]:
    """The training-cost tables and plots per backbone, and the goals they are checked against."""
    rows_by_bb: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in cost.get("results", []):
        rows_by_bb[r["backbone"]].append(r)
    catalogs = cost.get("catalogs", {})
    parts: list[str] = []
    checks: list[Check] = []
    goals = cost.get("goals", {"step_ratio": 0.35, "memory_ratio": 0.5, "cache_ratio": 0.2})
    for bb, rows in rows_by_bb.items():
        rec = catalogs.get(bb, {}).get("recommended_layer")
        names = {layer["index"]: layer["name"] for layer in catalogs.get(bb, {}).get("layers", [])}
        table = [_cost_row(r, _cost_label(r, names, rec)) for r in rows]
        first = rows[0]
        head = f"#### {bb} ({first['input_size'][0]} px, batch {first['batch_size']}, {first['device']}{tag})"
        parts.append(head + "\n\n" + md_table(_COST_HEADERS, table))
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
            png = _cost_plot(ap_rows, bb, rec, goals, out_dir, tag)
            parts.append(f"![cost {bb}]({png})")
        rec_row = next((r for r in ap_rows if r["prompt_layer"] == rec), None)
        if not bb.startswith("vit") and rec_row is not None:
            checks += _cost_checks(rec_row, bb, rec, goals, tag)
    fc = cost.get("feature_cache")
    if fc:
        text, check = _feature_cache_part(fc, goals)
        parts.append(text)
        checks.append(check)
    return "\n\n".join(parts), checks


def _prov_line(name: str, data: dict[str, Any] | None) -> str | None:
    p = (data or {}).get("provenance")
    if not p:
        return None
    m = p.get("machine") or {}
    return (
        f"- `{name}`: commit `{str(p.get('commit'))[:12]}`{' (dirty)' if p.get('dirty') else ''}, "
        f"`{p.get('command')}`, {p.get('started')} → {p.get('finished')}, "
        f"{m.get('cpu_model') or m.get('device_name')} "
        f"({m.get('cpu_count')} cores), torch {p.get('torch')}, timm {p.get('timm')}"
    )


def _header(acc: dict[str, Any], cost: dict[str, Any], serving: dict[str, Any]) -> list[str]:
    """Title, where each results file comes from, and the accuracy run's budget and gaps."""
    lines = [
        "# actprompt benchmarks",
        "",
        "Generated by `make bench` from the JSON beside this file; nothing here is edited by hand.",
        "",
    ]
    files = (("accuracy.json", acc), ("training_cost.json", cost), ("serving.json", serving))
    lines += [x for x in (_prov_line(n, d) for n, d in files) if x]
    commits = {
        str((d.get("provenance") or {}).get("commit")) for d in (acc, cost, serving) if d.get("provenance")
    }
    if len(commits) > 1:
        lines += ["", f"**Mixed commits:** these files come from {len(commits)} commits; rerun `make bench`."]
    if acc.get("results"):
        lines += ["", "## Budget", "", *budget_section(acc, cost)]
        if not acc.get("complete", True):
            lines += [
                "",
                f"**Incomplete:** still missing {', '.join(acc.get('missing', [])[:12])}; rerun to resume.",
            ]
        if acc.get("errors"):
            errs = "; ".join(f"{k}: {v}" for k, v in list(acc["errors"].items())[:5])
            lines += ["", f"**{len(acc['errors'])} runs failed** (not retried in that run): {errs}"]
    return lines


def _accuracy_body(acc: dict[str, Any]) -> list[str]:
    body = [
        "## Accuracy (test %, mean ± std over seeds)",
        "",
        "Train time: `fit`'s own epoch timer (wall clock). Peak memory: the worker's resident high-water "
        "mark above its level before the run (the feature cache included), measured in a worker that "
        "ran other configurations before, after handing their freed heap pages back to the kernel "
        "(`malloc_trim`), so that the run's own allocations show; sampled by the kernel, not by the "
        "allocator. The training-cost section measures memory in a fresh process per configuration.",
        "",
        accuracy_tables(acc),
        "",
    ]
    f = findings(acc)
    if f:
        body += ["In numbers (a difference within the seeds' std, or 0.5 point, is called noise):", ""]
        body += [f"- {x}" for x in f] + [""]
    cal = calibration_section(acc)
    if cal:
        body += [
            "### Against the external reference run",
            "",
            "The reference used 8,000 training images and 10 epochs; this run's budget is in the table "
            "above, so lower numbers are expected where the budget is smaller.",
            "",
            cal,
            "",
        ]
    body += reference_budget_section(acc)
    body += ["### Learning rates", "", lr_section(acc), ""]
    body += [
        "## Layer sweep (AP at one layer, seed 0; the layer is chosen on validation)",
        "",
        sweep_section(acc),
        "",
    ]
    return body


_COST_INTRO = (
    "Step = one training step (forward, backward, AdamW) on a random batch, median of the timed "
    'steps, each configuration in a fresh subprocess. "Prefix cached" runs through the engine\'s '
    "FeatureCache, filled for the stated number of images inside the measured region, so its peak "
    "memory includes the cache. Ratios to VP use the process CPU time on the CPU. "
    "★ = recommended layer."
)


def api_reference_checks(doc: dict[str, Any]) -> list[Check]:
    """The goals of bench/api_lora_reference.py (LoRA and `auto` jobs through the HTTP API)."""
    if not doc.get("goals") or (doc.get("provenance") or {}).get("quick"):
        return []
    g, bench_ref = doc["goals"], doc["benchmark"]
    top1 = doc["evaluation"]["top1"]
    commit = str((doc.get("provenance") or {}).get("commit", "?"))[:7]
    checks: list[Check] = [
        (
            f"ResNet-20 → GTSRB: LoRA r=4 job through the API ≥ {pct(g['top1_at_least'])} %",
            bool(g["met_top1"]),
            f"{pct(top1)} % test top-1 (bench/results/api_lora_reference.json, at {commit})",
        ),
        (
            "ResNet-20 → GTSRB: the API's LoRA within 1 point of the benchmark's",
            bool(g["met_gap"]),
            f"{g['gap_points']:+.2f} points against {pct(bench_ref['test_top1_mean'])} % (mean of seeds "
            f"{bench_ref['seeds']})",
        ),
    ]
    auto = doc.get("auto")
    if auto and "met_auto" in g:
        best = auto["benchmark_best"]
        chosen = (auto["job"].get("auto") or {}).get("chosen", "?")
        checks.append(
            (
                "ResNet-20 → GTSRB: `auto` through the API within 0.5 points of the best of its methods",
                bool(g["met_auto"]),
                f"chose {chosen} on validation: {pct(auto['evaluation']['top1'])} % test top-1; best in the "
                f"benchmark's reference rows {best['variant']} {pct(best['test_top1_mean'])} % "
                f"({g['auto_gap_points']:+.2f} points)",
            )
        )
    return checks


def _goals_table(checks: list[Check]) -> list[str]:
    verdict = {True: "yes", False: "**no**", None: "see detail"}
    rows = [[label, verdict[ok], detail] for label, ok, detail in checks]
    return ["", "## Goals (bench/GOALS.md), per backbone", "", md_table(["goal", "met", "measured"], rows)]


def build(out_dir: Path) -> Path:
    """Rewrite `out_dir/REPORT.md` (and the cost plots) from the results JSON in `out_dir`."""
    acc = read_json(out_dir / "accuracy.json") or {}
    cost = read_json(out_dir / "training_cost.json") or {}
    serving = read_json(out_dir / "serving.json") or {}
    lines = _header(acc, cost, serving)
    checks: list[Check] = []
    body: list[str] = []
    if acc.get("results"):
        body += _accuracy_body(acc)
        checks += accuracy_goals(acc)
    if cost.get("results"):
        text, c = cost_section(cost, out_dir)
        body += ["## Training cost", "", _COST_INTRO, "", text, ""]
        checks += c
    if (out_dir / "serving.md").exists():
        body += ["## Serving", "", "Written by `bench/serving.py`: see [serving.md](serving.md).", ""]
    if (out_dir / "fleet.md").exists():
        body += ["## Fleet", "", "Written by `bench/fleet.py`: see [fleet.md](fleet.md).", ""]
    checks += api_reference_checks(read_json(out_dir / "api_lora_reference.json") or {})
    checks += serving_goals(serving)
    if serving.get("peers") or serving.get("overload") or serving.get("soak"):
        from bench.serving_peers import goal_checks  # peers, overload, soak, workers, HTTP ÷ engine

        checks += [
            (f"{goal} ({target})", ok, measured) for goal, measured, target, ok in goal_checks(serving)
        ]
    if checks:
        lines += _goals_table(checks)
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
