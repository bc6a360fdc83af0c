"""bench/fleet.py's own arithmetic: the traffic it draws and how it reads recovery from per-second counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bench.fleet import Traffic, _recovered_at


def test_traffic_is_zipf_and_a_hot_prompt_takes_its_share() -> None:
    refs = [f"p{i}" for i in range(1000)]
    ranks = np.arange(1, 1001) ** -1.1
    top = ranks[0] / ranks.sum()
    plain = Traffic(refs, refs, 1.1, seed=5)
    counts = Counter(plain.pick() for _ in range(40_000))
    assert counts[int(plain.order[0])] / 40_000 == pytest.approx(top, abs=0.01)
    assert counts[int(plain.order[9])] / 40_000 == pytest.approx(ranks[9] / ranks.sum(), abs=0.006)
    hot = Traffic(refs, refs, 1.1, seed=5, hot_share=0.5)
    share = Counter(hot.pick() for _ in range(40_000))[int(hot.order[0])] / 40_000
    assert share == pytest.approx(0.5 + 0.5 * top, abs=0.01)


def test_traffic_counts_first_references_once() -> None:
    t = Traffic(["a", "b"], ["k", "k"], 1.1)
    for i in (0, 1, 0, 0, 1):
        t.note(i)
    assert t.first_touches == 2


def test_recovery_is_the_first_good_stretch_after_the_last_failure() -> None:
    # (second, answered, failed): the rate is back at 1 s, but a predict still fails at 2 s
    ws = [(0.0, 20, 3), (1.0, 50, 0), (2.0, 50, 1), (3.0, 50, 0), (4.0, 50, 0), (5.0, 50, 0), (6.0, 50, 0)]
    ws.append((7.0, 5, 0))  # cut by the end of the run: never counted
    assert _recovered_at(ws, base_rate=60) == 3.0
    assert _recovered_at(ws, base_rate=70) is None  # never 3 s at 80 % of 70
