"""A whole benchmark run starts from an empty results folder, but keeps what it does not regenerate."""

from __future__ import annotations

from pathlib import Path

from bench.accuracy import PLANS
from bench.run_all import KEPT_FILES, clear_outputs


def test_a_whole_run_clears_its_outputs_but_keeps_results_written_elsewhere(tmp_path: Path) -> None:
    for name in ("accuracy.json", "REPORT.md", "sweep_resnet20_cifar.png", *KEPT_FILES):
        (tmp_path / name).write_text("{}")
    (tmp_path / "soak").mkdir()
    clear_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["soak", *KEPT_FILES])
    assert "api_lora_reference.json" in KEPT_FILES


def test_the_default_plan_has_both_reference_scopes_after_the_scopes_they_take_settings_from() -> None:
    scopes = PLANS["default"].scopes
    names = [s.name for s in scopes]
    for s in scopes:
        if s.settings_from:
            assert s.settings_from in names[: names.index(s.name)]
    assert {"resnet20_cifar/gtsrb@reference", "vit_cifar10_p4_d128_l6/gtsrb@reference"} <= set(names)
