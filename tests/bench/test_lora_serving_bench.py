"""The LoRA serving benchmark in miniature: every case runs, ratios come from the timings, the report
names the goals."""

from __future__ import annotations

from bench.lora_serving import LORA_CASES, bench_lora
from bench.serving import lora_lines
from service.engine import BackboneSpec, create_backbone


def test_every_case_runs_and_the_report_names_the_goals() -> None:
    bb = create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))
    r = bench_lora(bb, batch=6, adapters=3, reps=1)
    assert set(r["throughput_rows_per_s"]) == set(LORA_CASES)
    assert all(v > 0 for v in r["throughput_rows_per_s"].values())
    ratio = r["throughput_rows_per_s"]["mixed"] / r["throughput_rows_per_s"]["peft_mixed"]
    assert abs(r["mixed_vs_peft_mixed"] - ratio) < 1e-3  # the ratio is computed, not written in
    md = "\n".join(
        lora_lines(
            {
                "goals": {"mixed_vs_one_adapter": 0.85, "mixed_vs_peft_mixed": 3.0},
                "machine": {"timestamp": "t", "device_name": "cpu"},
                "note": "n",
                "backbones": {"test_resnet": r},
            }
        )
    )
    assert "mixed/peft-mixed (>=3.0)" in md and "test_resnet" in md
