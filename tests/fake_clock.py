"""A clock the test moves by hand: time-based code under test takes it as its `clock`."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
