"""The peer benchmark end to end on real servers, at a tiny budget: actprompt, the minimal peer, LitServe.

Each server is started for real (LitServe from .venv-peers, `make peers-venv`), probed for the reference
top-1 and measured; serving.json gains the binding keys while the keys other benchmarks wrote survive.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import serving_peers
from bench.common import write_json
from bench.serving_peers import PEERS_PYTHON, Plan, goal_checks

TINY = Plan(
    connections=(4,),
    seconds=1.0,
    prompts=6,
    tenants=2,
    many_requests=40,
    p70_seconds=1.0,
    overload_seconds=1.0,
    overload_timeout=5.0,
    start_timeout=300.0,
    warmup_seconds=1.0,
)


@pytest.mark.slow
def test_peers_are_measured_side_by_side_and_other_keys_survive(tmp_path: Path) -> None:
    if not PEERS_PYTHON.exists():
        pytest.skip(f"{PEERS_PYTHON} is missing: `make peers-venv` installs the serving frameworks")
    results = tmp_path / "serving.json"
    write_json(results, {"http_vs_engine": {"1": 0.5}, "soak": {"minutes": 30}})
    details = serving_peers.run(
        TINY, tmp_path / "peers", results, ["actprompt", "minimal", "litserve"], PEERS_PYTHON
    )
    assert details["failures"] == {}, details["failures"]
    doc = json.loads(results.read_text())
    assert doc["http_vs_engine"] == {"1": 0.5} and doc["soak"] == {"minutes": 30}
    peers = doc["peers"]
    for wl in serving_peers.WORKLOADS:
        for server in ("actprompt", "minimal", "litserve"):
            cell = peers[wl][server]
            assert set(serving_peers.PEER_KEYS) <= set(cell)
            assert cell["images_per_s"] > 0 and cell["errors"] == 0 and cell["cpu_ms_per_request"] > 0
    assert peers["many_prompts"]["litserve_gather"]["images_per_s"] > 0
    assert peers["provenance"]["commit"] and peers["tuning"]["litserve"]["BENCH_MAX_BATCH"] == "64"
    over = doc["overload"]
    assert set(over) >= {"x0.5", "x1", "x1.5", "x2", "x3", "provenance"}
    for k in ("x0.5", "x1", "x1.5", "x2", "x3"):
        assert set(serving_peers.OVERLOAD_KEYS) <= set(over[k]) and over[k]["goodput_ratio"] > 0
        assert over[k]["server_cores"]["engine"] > 0 and over[k]["server_cores"]["front"] > 0
    assert "front_cost" in over
    measured = {g: ok for g, _, _, ok in goal_checks(doc)}
    assert measured["many prompts: actprompt ÷ litserve_gather"] is not None
    assert (tmp_path / "peers" / "serving_peers.png").stat().st_size > 0


def test_a_server_that_gives_other_answers_is_not_measured(tmp_path: Path) -> None:
    """A peer whose top-1 differs from the engine's reference is a failure, not a row of numbers."""
    plan = Plan((2,), 1.0, 3, 1, 10, 1.0, 1.0, 5.0, start_timeout=300.0)
    corpus = serving_peers.make_corpus(plan)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for k, art in enumerate(corpus.artifacts):
        (prompts / f"p{k}.safetensors").write_bytes(art)
    corpus.reference = serving_peers.reference_top1(corpus, prompts, [0, 1, 2])
    target = serving_peers.start_peer("minimal", prompts, corpus, Path(sys.executable), plan, tmp_path)
    try:
        serving_peers.check_top1(target, corpus)  # the real server agrees
        corpus.reference[1] = [(i + 1) % serving_peers.NUM_CLASSES for i in corpus.reference[1]]
        with pytest.raises(RuntimeError, match="top-1"):
            serving_peers.check_top1(target, corpus)
    finally:
        target.server.stop()


def test_front_cost_recovers_what_an_admitted_and_a_refused_predict_cost() -> None:
    """Fronts that spend 1.1 ms per admitted and 0.2 ms per refused predict, seen at three rates."""
    rates = {
        key: {
            "ok": ok,
            "refused": refused,
            "wall_s": 10.0,
            "server_cores": {"front": (1.1 * ok + 0.2 * refused) / 1e4},
        }
        for key, ok, refused in (("x1", 6000, 500), ("x2", 5000, 10000), ("x3", 4000, 20000))
    }
    assert serving_peers.front_cost(rates) == {"front_ms_per_admitted": 1.1, "front_ms_per_refused": 0.2}
    only_one = {"x0.5": {**rates["x1"], "refused": 0}, "x3": rates["x3"]}
    assert serving_peers.front_cost(only_one) is None  # one rate with refusals cannot separate the two costs
