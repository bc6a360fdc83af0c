"""Prefixed, time-ordered ids: hex milliseconds then random hex, so id order = creation order."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"
