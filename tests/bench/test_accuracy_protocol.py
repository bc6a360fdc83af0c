"""The accuracy benchmark's protocol on a tiny real plan: selection on validation, grids extended at an
edge, binding row keys, provenance, resume from the row cache, and no mixing of commits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy, report
from bench.accuracy import Plan, Scope
from bench.provenance import MixedCommits, code_identity

BINDING = {
    "backbone", "dataset", "method", "prompt_layer", "prompt_shape", "seed", "lr", "lr_grid", "epochs",
    "train_images", "val_accuracy", "test_accuracy", "trainable_params", "train_seconds", "peak_memory_bytes",
}  # fmt: skip

TINY = Plan(
    name="test",
    scopes=(
        Scope(
            "resnet20_cifar", "gtsrb", n_train=64, n_val=48, n_test=48, epochs=1, batch_size=32,
            seeds=(0, 1), variants=("linear", "ap", "deep_ap_norm"), grid_points=2, sweep_stride=5,
            max_extensions=1, lr_centres=(("linear", 1e-3),),
        ),
        Scope(  # a larger budget at the choices above: nothing tuned, no sweep
            "resnet20_cifar", "gtsrb", n_train=96, n_val=48, n_test=48, epochs=1, batch_size=32,
            variants=("linear", "ap"), settings_from="resnet20_cifar/gtsrb", tag="bigger",
        ),
    ),
)  # fmt: skip


#: The code identity the rows are cached under, fixed for the module (edits to the tree meanwhile
#: would otherwise, rightly, make a rerun start over).
IDENTITY = code_identity()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("acc")
    return out, accuracy.run(TINY, out, jobs=1, identity=IDENTITY)


def test_rows_carry_the_binding_keys_and_provenance(run: tuple[Path, dict]) -> None:
    _, payload = run
    assert set(payload["provenance"]) >= {"commit", "dirty", "command", "started", "finished", "machine"}
    assert {"torch", "timm"} <= set(payload["provenance"])
    methods = {r["method"] for r in payload["results"]}
    assert methods == {"linear", "activation", "deep_activation_norm"}
    for row in payload["results"]:
        assert set(row) >= BINDING, BINDING - set(row)
        assert row["provenance"]["commit"] == payload["provenance"]["commit"]
        assert row["lr"] in row["lr_grid"]
        # measured in a reused worker process: freed memory of the runs before must not hide the peak
        assert row["peak_memory_bytes"] > 0, row
    assert payload["complete"] and (run[0] / "sweep_resnet20_cifar.png").exists()


def test_lr_and_layer_are_chosen_on_validation_and_grids_grow_at_an_edge(run: tuple[Path, dict]) -> None:
    _, payload = run
    for g in payload["lr_search"]:
        vals = g["val_accuracy"]
        assert g["lr"] == g["lr_grid"][vals.index(max(vals))]  # the best validation accuracy, not test
        # a 2-point initial grid always has its best at an edge, so it must have grown by one
        assert len(g["lr_grid"]) == 3, f"grid {g['lr_grid']} was not extended at its edge"
    # the scope's own starting point for linear (1e-3), not the default centre (3e-2)
    linear = next(g for g in payload["lr_search"] if g["variant"] == "linear")
    assert {1e-3, 3e-3} <= set(linear["lr_grid"]) and 3e-2 not in linear["lr_grid"], linear["lr_grid"]
    sweep = payload["sweep"]
    chosen = [r for r in sweep if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in sweep)
    ap_rows = [r for r in payload["results"] if r["variant"] == "ap"]
    assert {r["prompt_layer"] for r in ap_rows} == {chosen[0]["prompt_layer"]}
    assert sorted(r["seed"] for r in ap_rows) == [0, 1]


def test_a_rerun_at_the_same_commit_resumes_and_another_commit_is_refused(run: tuple[Path, dict]) -> None:
    out, first = run
    again = accuracy.run(
        TINY, out, jobs=1, identity=IDENTITY
    )  # every row from the cache: same rows, same timestamps
    assert [r["provenance"]["finished"] for r in again["results"]] == [
        r["provenance"]["finished"] for r in first["results"]
    ]
    path = out / "accuracy.json"
    data = json.loads(path.read_text())
    data["provenance"]["commit"] = "0" * 40
    path.write_text(json.dumps(data))
    with pytest.raises(MixedCommits, match="run the whole"):
        accuracy.run(TINY, out, jobs=1, only={"resnet20_cifar/gtsrb"}, identity=IDENTITY)


def test_a_borrowing_scope_trains_at_the_sources_validation_choices_only(run: tuple[Path, dict]) -> None:
    _, payload = run
    chosen = {r["variant"]: (r["lr"], r["prompt_layer"]) for r in payload["results"] if r["seed"] == 0}
    borrowed = payload["reference_budget"]
    assert {r["variant"] for r in borrowed} == {"linear", "ap"}
    for r in borrowed:
        assert r["train_images"] == 96 and r["scope"] == "resnet20_cifar/gtsrb@bigger"
        assert (r["lr"], r["prompt_layer"]) == chosen[r["variant"]]
    # its rows stay out of the per-(backbone, dataset) table and it tunes nothing of its own
    assert all(r["train_images"] == 64 for r in payload["results"])
    assert sorted(g["variant"] for g in payload["lr_search"]) == ["ap", "deep_ap_norm", "linear"]
    text = "\n".join(report.reference_budget_section(payload))
    assert "resnet20_cifar/gtsrb@bigger" in text and "96 training images" in text


def test_a_scope_cannot_borrow_from_a_later_one() -> None:
    later = Plan(name="bad", scopes=(TINY.scopes[1], TINY.scopes[0]))
    catalogs = {"resnet20_cifar": {"recommended_layer": 8}}
    protocol = accuracy.Protocol(later, cache=None, catalogs=catalogs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="earlier scope"):
        protocol.walk()
