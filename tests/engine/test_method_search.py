"""`method: "auto"`: candidates trained on train, chosen on validation only, every row recorded."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from service.engine import BackboneSpec, EngineError, TrainingCancelled, create_backbone
from service.engine.backbones import Backbone
from service.engine.data import ImageSet, LoadedDataset, ValidationReport
from service.engine.errors import MethodError
from service.engine.method_search import DEFAULT_CANDIDATES, AutoConfig, Candidate, choose
from service.engine.pipeline import PipelineCallbacks, PreparedData, SplitSpec, prepare_dataset, train_prompt
from service.engine.train import Checkpoint, TrainConfig
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


# --- checkpoints: a restarted search trains only what was not finished ----------------------------------
#: The second candidate probes its layer, so resuming it mid-training shows the probe is not run again.
RESUMABLE = (
    Candidate("linear", 0.01),
    Candidate("activation", 0.1, prompt_layer="auto"),
    Candidate("deep_activation_norm", 0.03),
)
#: Row fields that are measured (wall-clock), so they differ between two runs of the same search.
TIMED = ("train_seconds", "serving_ms_per_image")


@dataclass
class Searched:
    """A finished search: its result and the checkpoints it wrote (the last one holds every candidate)."""

    result: Any
    checkpoints: list[Checkpoint]

    def candidate_tensors(self) -> list[dict[str, torch.Tensor] | None]:
        finished = self.checkpoints[-1].state["finished"]
        return [None if f["result"] is None else f["result"]["tensors"] for f in finished]


def _resumable(
    bb: Backbone,
    data: PreparedData,
    *,
    callbacks: PipelineCallbacks | None = None,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
    resume: Checkpoint | None = None,
    **auto: Any,
) -> Searched:
    from service.engine.method_search import train_auto

    seed = auto.pop("seed", 0)
    cb = callbacks or PipelineCallbacks()
    kept: list[Checkpoint] = []

    def keep(ckpt: Checkpoint) -> None:
        kept.append(ckpt)
        if cb.on_checkpoint is not None:
            cb.on_checkpoint(ckpt)

    result = train_auto(
        bb, data, auto=AutoConfig(**{"candidates": RESUMABLE, **auto}),
        config=TrainConfig(epochs=2, batch_size=32, seed=seed), callbacks=replace(cb, on_checkpoint=keep),
        on_candidate=on_candidate, resume=resume,
    )  # fmt: skip
    return Searched(result, kept)


def _assert_same_search(resumed: Searched, uninterrupted: Searched, *, every_candidate: bool = True) -> None:
    """The same table (bar the measured fields), the same choice, the chosen prompt (and with
    `every_candidate`, every candidate's) bit for bit, the same test score."""

    def untimed(result: Any) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in TIMED} for r in result.metrics["auto"]["candidates"]]

    ours, theirs = resumed.result, uninterrupted.result
    assert untimed(ours) == untimed(theirs)
    assert ours.method == theirs.method and ours.layers == theirs.layers
    pairs = [(ours.result.artifact.tensors, theirs.result.artifact.tensors)]
    if every_candidate:
        pairs += zip(resumed.candidate_tensors(), uninterrupted.candidate_tensors(), strict=True)
    for a, b in pairs:
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.metrics["test"] == theirs.metrics["test"]


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(method, epoch it resumed at) of every candidate's training."""
    import service.engine.train as train_module

    calls: list[tuple[str, int]] = []
    real = train_module.fit

    def counting(backbone: Backbone, method: str, *args: Any, resume: Any = None, **kwargs: Any) -> Any:
        calls.append((method, 0 if resume is None else resume.epoch))
        return real(backbone, method, *args, resume=resume, **kwargs)

    monkeypatch.setattr(train_module, "fit", counting)
    return calls


@pytest.fixture(scope="module")
def uninterrupted(bb: Backbone, data: PreparedData) -> Searched:
    return _resumable(bb, data)


@pytest.fixture(scope="module")
def after_first(bb: Backbone, data: PreparedData) -> tuple[bytes, dict[str, Any]]:
    """A search that died once its first candidate was reported: (its last checkpoint, as a worker
    stored it; the first candidate's row)."""
    stored: list[bytes] = []
    rows: list[dict[str, Any]] = []

    def die(row: dict[str, Any]) -> None:
        rows.append(dict(row))
        raise RuntimeError("the worker died")

    callbacks = PipelineCallbacks(on_checkpoint=lambda c: stored.append(c.to_bytes()))
    with pytest.raises(RuntimeError, match="worker died"):
        _resumable(bb, data, callbacks=callbacks, on_candidate=die)
    assert [r["method"] for r in rows] == ["linear"]
    return stored[-1], rows[0]


def test_a_resumed_search_does_not_train_its_finished_candidates_again(
    bb: Backbone, data: PreparedData, uninterrupted: Searched, after_first: tuple[bytes, dict], fits: list
) -> None:
    stored, first_row = after_first
    epochs: list[Any] = []
    reported: list[dict[str, Any]] = []
    resumed = _resumable(
        bb, data, callbacks=PipelineCallbacks(on_epoch_end=epochs.append), on_candidate=reported.append,
        resume=Checkpoint.from_bytes(stored),
    )  # fmt: skip
    assert fits == [("activation", 0), ("deep_activation_norm", 0)]  # not linear: it had finished
    assert len(epochs) == 4
    table = resumed.result.metrics["auto"]["candidates"]
    # its row as it was reported, measured training seconds and serving cost included
    assert {k: v for k, v in table[0].items() if k != "chosen"} == first_row
    assert [r["method"] for r in reported] == ["activation", "deep_activation_norm"]
    assert resumed.result.metrics["auto"]["train_seconds"] == pytest.approx(
        sum(r["train_seconds"] for r in table), abs=0.01
    )
    _assert_same_search(resumed, uninterrupted)


def test_a_search_resumes_its_running_candidate_at_its_next_epoch(
    bb: Backbone, data: PreparedData, uninterrupted: Searched, fits: list
) -> None:
    stored: list[bytes] = []
    second_started: list[bool] = []

    def store(ckpt: Checkpoint) -> None:  # the worker dies in epoch 2 of the 2nd candidate
        stored.append(ckpt.to_bytes())
        if (ckpt.state["running"] or {}).get("index") == 1:
            second_started.append(True)

    def second_candidate_checkpointed() -> bool:
        return bool(second_started)

    callbacks = PipelineCallbacks(on_checkpoint=store, should_stop=second_candidate_checkpointed)
    with pytest.raises(TrainingCancelled):
        _resumable(bb, data, callbacks=callbacks)
    last = Checkpoint.from_bytes(stored[-1])
    assert last.kind == "search" and len(last.state["finished"]) == 1 and last.state["running"]["epoch"] == 1
    assert last.epoch == 2 + 1  # epochs of the search: linear's two, then the running one's first
    fits.clear()
    probes: list[Any] = []
    epochs: list[Any] = []
    resumed = _resumable(
        bb, data, callbacks=PipelineCallbacks(on_layer_probe=probes.append, on_epoch_end=epochs.append),
        resume=last,
    )  # fmt: skip
    assert fits == [("activation", 1), ("deep_activation_norm", 0)]
    assert probes == [] and len(epochs) == 1 + 2  # its layer came with the checkpoint, not a new probe
    _assert_same_search(resumed, uninterrupted)


def test_a_spent_budget_counts_the_finished_candidates_and_stores_the_chosen_without_training(
    bb: Backbone, data: PreparedData, fits: list
) -> None:
    stored: list[bytes] = []

    def die(row: dict[str, Any]) -> None:
        raise RuntimeError("the worker died")

    callbacks = PipelineCallbacks(on_checkpoint=lambda c: stored.append(c.to_bytes()))
    with pytest.raises(RuntimeError):
        _resumable(bb, data, callbacks=callbacks, on_candidate=die, max_train_seconds=1e-6)
    fits.clear()
    resumed = _resumable(bb, data, resume=Checkpoint.from_bytes(stored[-1]), max_train_seconds=1e-6)
    assert fits == []  # the budget was spent by the finished candidate: nothing else trains
    table = resumed.result.metrics["auto"]["candidates"]
    assert table[0]["chosen"] and all("budget" in r["skipped"] for r in table[1:])
    # the chosen candidate was rebuilt from the checkpoint (the resumed search wrote none: it trained nothing)
    assert resumed.checkpoints == []
    _assert_same_search(resumed, _resumable(bb, data, max_train_seconds=1e-6), every_candidate=False)


def test_a_checkpoint_of_another_run_is_refused(
    bb: Backbone, data: PreparedData, after_first: tuple[bytes, dict], fits: list
) -> None:
    ckpt = Checkpoint.from_bytes(after_first[0])
    x, y = data.train
    others: list[tuple[dict[str, Any], PreparedData, str]] = [
        ({"seed": 1}, data, "train_config.seed"),
        ({"prefer": "cost"}, data, "auto.prefer"),
        ({"max_train_seconds": 60.0}, data, "auto.max_train_seconds"),
        ({"candidates": RESUMABLE[:2]}, data, "auto.candidates"),
        ({}, replace(data, train=(x, 1 - y)), "data.labels"),
    ]
    for options, other_data, differs in others:
        with pytest.raises(MethodError, match=rf"another method search \({differs} differs\)"):
            _resumable(bb, other_data, resume=ckpt, **options)
    # one method's checkpoint does not resume a search, nor a search's checkpoint one method
    with pytest.raises(MethodError, match="not a method search") as info:
        _resumable(bb, data, resume=Checkpoint(epoch=1, state={}))
    assert info.value.code == "invalid_checkpoint"
    assert fits == []
    with pytest.raises(MethodError, match="not one method's training"):
        train_prompt(bb, data, "linear", config=TrainConfig(epochs=2, batch_size=32), resume=ckpt)
    # a payload of a later format is refused, not misread
    buf = io.BytesIO()
    torch.save({"version": 99, "kind": "search", "epoch": 1, "state": {}}, buf)
    with pytest.raises(EngineError, match="not one this version reads"):
        Checkpoint.from_bytes(buf.getvalue())
