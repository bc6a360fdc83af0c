"""Serving comparisons call a difference smaller than the timings' spread "no difference"."""

from __future__ import annotations

from bench.serving import compare


def test_a_difference_inside_the_spread_is_no_difference() -> None:
    a = [1.00, 1.10, 0.90, 1.05, 0.95]
    b = [1.02, 1.12, 0.92, 1.07, 0.97]  # medians 0.02 apart, spread 0.10
    assert compare(a, b)["verdict"] == "no difference"


def test_a_difference_beyond_the_spread_is_reported_with_its_direction() -> None:
    a = [1.00, 1.01, 0.99, 1.00, 1.02]
    b = [2.00, 2.01, 1.99, 2.00, 2.02]
    out = compare(a, b)
    assert out["verdict"] == "faster" and out["ratio"] == 2.0
    assert compare(b, a)["verdict"] == "slower"
