"""The API reference bench's goal arithmetic: the benchmark rows it compares with, what the report says."""

from __future__ import annotations

from typing import Any

from bench import api_lora_reference as ref
from bench import report


def _row(variant: str, seed: int, test: float, lr: float = 0.01) -> dict[str, Any]:
    return {
        "backbone": "resnet20_cifar",
        "dataset": "gtsrb",
        "variant": variant,
        "seed": seed,
        "lr": lr,
        "test_accuracy": test,
    }


ACC = {
    "reference_budget": [
        _row("lora_r4", 0, 0.93),
        _row("lora_r4", 1, 0.95),
        _row("deep_ap_norm", 0, 0.90),
        _row("deep_ap_norm", 1, 0.92),
        _row("ap", 0, 0.85),
        _row("full", 0, 0.99),  # not one of auto's methods: never the bar
        {**_row("lora_r4", 0, 0.50), "backbone": "resnet56_cifar"},  # another backbone: ignored
    ]
}


def test_the_bar_for_auto_is_the_best_mean_among_its_own_methods() -> None:
    best = ref.best_auto_candidate(ACC)
    assert best["variant"] == "lora_r4"
    assert abs(best["test_top1_mean"] - 0.94) < 1e-9
    assert set(best["means"]) == {"lora_r4", "deep_ap_norm", "ap"}
    lora = ref.benchmark_reference(ACC)
    assert lora["seeds"] == [0, 1] and lora["lr"] == 0.01


def _doc(lora_top1: float, auto_top1: float) -> dict[str, Any]:
    best = ref.best_auto_candidate(ACC)
    bench_ref = ref.benchmark_reference(ACC)
    return {
        "provenance": {"commit": "abcdef0123", "quick": False},
        "benchmark": bench_ref,
        "evaluation": {"top1": lora_top1},
        "auto": {
            "evaluation": {"top1": auto_top1},
            "job": {"auto": {"chosen": "lora"}},
            "benchmark_best": best,
        },
        "goals": {
            "top1_at_least": ref.GOAL_TOP1,
            "met_top1": lora_top1 >= ref.GOAL_TOP1,
            "met_gap": abs(lora_top1 - bench_ref["test_top1_mean"]) <= ref.GOAL_GAP,
            "gap_points": round(100 * (lora_top1 - bench_ref["test_top1_mean"]), 2),
            "auto_gap_points": round(100 * (auto_top1 - best["test_top1_mean"]), 2),
            "met_auto": auto_top1 >= best["test_top1_mean"] - ref.GOAL_AUTO_GAP,
        },
    }


def test_report_states_each_api_goal_met_or_missed() -> None:
    met = report.api_reference_checks(_doc(0.94, 0.937))
    assert [ok for _, ok, _ in met] == [True, True, True]
    missed = report.api_reference_checks(_doc(0.92, 0.93))
    assert [ok for _, ok, _ in missed] == [False, False, False]
    assert "-1.00 points" in missed[2][2] and "lora_r4 94.0 %" in missed[2][2]


def test_a_quick_run_publishes_no_goal() -> None:
    doc = _doc(0.94, 0.94)
    doc["provenance"]["quick"] = True
    assert report.api_reference_checks(doc) == []


def test_method_guidance_names_the_best_servable_method_and_what_the_others_give_up() -> None:
    def row(variant: str, test: float, secs: float, servable: bool = True) -> dict[str, Any]:
        return {**_row(variant, 0, test), "train_seconds": secs, "servable": servable, "scope": "r20@ref"}

    acc = {
        "reference_budget": [
            row("lora_r4", 0.936, 200.0),
            row("deep_ap_norm", 0.921, 100.0),
            row("ap", 0.848, 40.0),
            row("full", 0.99, 150.0, servable=False),  # not served: never the recommendation
        ]
    }
    text = "\n".join(report.method_guidance(acc))
    assert "LoRA r=4 (peft) is the most accurate servable method (93.6 %, 200 s to train)" in text
    assert "deep AP + norm-tune -1.5 points at 0.50\u00d7 its training time" in text
    assert "full fine-tuning" not in text
