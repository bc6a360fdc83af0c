"""`method: "auto"`: candidates trained on train, chosen on validation only, every row recorded."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from service.engine import BackboneSpec, EngineError, create_backbone
from service.engine.backbones import Backbone
from service.engine.data import ImageSet, LoadedDataset, ValidationReport
from service.engine.method_search import DEFAULT_CANDIDATES, AutoConfig, Candidate, choose
from service.engine.pipeline import PreparedData, SplitSpec, prepare_dataset, train_prompt
from service.engine.train import TrainConfig
from tests.signal_data import CLASSES, square_images

ROW_KEYS = {"method", "val_accuracy", "trainable_params", "train_seconds", "serving_ms_per_image", "chosen"}


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))


@pytest.fixture(scope="module")
def data(bb: Backbone) -> PreparedData:
    """Signal data whose test labels are the validation labels flipped: a search that looked at test
    would prefer the candidate that is worst on validation."""
    x, y = square_images(160, seed=0)
    report = ValidationReport(2, {c: 80 for c in CLASSES}, num_train=160)
    ds = LoadedDataset(list(CLASSES), ImageSet(x, y), None, None, report)
    prepared = prepare_dataset(ds, bb, SplitSpec(val_fraction=0.25, seed=0))
    assert prepared.val is not None
    vx, vy = prepared.val
    return replace(prepared, test=(vx, 1 - vy))


def _search(bb: Backbone, data: PreparedData, auto: AutoConfig) -> Any:
    cfg = TrainConfig(epochs=2, batch_size=32)
    options = {"prefer": auto.prefer, "max_train_seconds": auto.max_train_seconds}
    if auto.candidates == DEFAULT_CANDIDATES:
        return train_prompt(bb, data, "auto", method_options=options, config=cfg)
    from service.engine.method_search import train_auto

    return train_auto(bb, data, auto=auto, config=cfg)


CANDIDATES = (
    Candidate("activation", 0.1, prompt_layer=2),
    Candidate("linear", 0.01),
    Candidate("deep_activation_norm", 0.03),
)


def test_auto_chooses_on_validation_and_records_every_candidate(bb: Backbone, data: PreparedData) -> None:
    seen: list[dict[str, Any]] = []
    from service.engine.method_search import train_auto

    result = train_auto(
        bb, data, auto=AutoConfig(candidates=CANDIDATES), config=TrainConfig(epochs=2, batch_size=32),
        on_candidate=seen.append,
    )  # fmt: skip
    table = result.metrics["auto"]["candidates"]
    assert [r["method"] for r in table] == [c.method for c in CANDIDATES] == [r["method"] for r in seen]
    for row in table:
        assert set(row) >= ROW_KEYS, ROW_KEYS - set(row)
        assert row["trainable_params"] > 0 and row["train_seconds"] > 0 and row["serving_ms_per_image"] > 0
    vals = [r["val_accuracy"] for r in table]
    assert len(set(vals)) > 1, f"candidates must differ on validation for the test to mean anything: {vals}"
    best = max(table, key=lambda r: (r["val_accuracy"], -r["trainable_params"]))
    assert [r["chosen"] for r in table].count(True) == 1 and best["chosen"]
    assert result.method == best["method"] == result.metrics["auto"]["chosen"]
    assert result.result.artifact.method == best["method"]
    # the test split (labels flipped) was evaluated for the chosen module only, after the choice
    assert result.accuracy("val") == pytest.approx(best["val_accuracy"])
    assert result.accuracy("test") == pytest.approx(1 - best["val_accuracy"])
    # the choice does not depend on the order the candidates are tried in
    reordered = train_auto(
        bb, data, auto=AutoConfig(candidates=CANDIDATES[::-1]), config=TrainConfig(epochs=2, batch_size=32)
    )
    assert reordered.method == result.method


def test_the_budget_stops_later_candidates(bb: Backbone, data: PreparedData) -> None:
    from service.engine.method_search import train_auto

    auto = AutoConfig(candidates=CANDIDATES, max_train_seconds=1e-6)
    result = train_auto(bb, data, auto=auto, config=TrainConfig(epochs=1, batch_size=32))
    table = result.metrics["auto"]["candidates"]
    assert table[0]["val_accuracy"] is not None and table[0]["chosen"]
    assert all(r["val_accuracy"] is None and "budget" in r["skipped"] for r in table[1:])
    assert result.method == "activation"


def test_choose_by_accuracy_or_cost() -> None:
    rows = [
        {"method": "a", "val_accuracy": 0.80, "serving_ms_per_image": 1.0, "trainable_params": 10},
        {"method": "b", "val_accuracy": 0.90, "serving_ms_per_image": 3.0, "trainable_params": 10},
        {"method": "c", "val_accuracy": 0.895, "serving_ms_per_image": 2.0, "trainable_params": 10},
        {"method": "d", "val_accuracy": None, "skipped": "budget"},
    ]
    assert choose(rows)["method"] == "b"
    assert choose(rows, "cost", tolerance=0.01)["method"] == "c"
    assert choose(rows, "cost", tolerance=0.2)["method"] == "a"
    tie = [{**rows[1], "method": "slow"}, {**rows[1], "method": "fast", "serving_ms_per_image": 0.5}]
    assert choose(tie)["method"] == "fast"
    small = [{**rows[1], "method": "big", "trainable_params": 99}, {**rows[1], "method": "small"}]
    assert choose(small)["method"] == choose(small[::-1])["method"] == "small"


def test_auto_options_are_checked(bb: Backbone, data: PreparedData) -> None:
    with pytest.raises(EngineError) as info:
        AutoConfig.from_options({"lora_rank": 4})
    assert info.value.param == "lora_rank"
    with pytest.raises(EngineError) as info:
        AutoConfig.from_options({"prefer": "speed"})
    assert info.value.param == "prefer"
    with pytest.raises(EngineError) as info:
        train_prompt(bb, data, "auto", prompt_layer=2, config=TrainConfig(epochs=1))
    assert info.value.param == "prompt_layer"
    no_val = replace(data, val=None)
    with pytest.raises(EngineError, match="validation"):
        train_prompt(bb, no_val, "auto", config=TrainConfig(epochs=1))


def test_auto_through_the_pipeline_trains_the_default_candidates(bb: Backbone, data: PreparedData) -> None:
    result = train_prompt(bb, data, "auto", config=TrainConfig(epochs=1, batch_size=32))
    methods = [r["method"] for r in result.metrics["auto"]["candidates"]]
    servable = [c.method for c in AutoConfig().servable_candidates()]
    assert methods == servable and methods[:2] == ["activation", "deep_activation_norm"]
    assert result.method in methods
    assert torch.isfinite(torch.tensor(result.accuracy("test") or 0.0))
