"""mosec peer: a decode stage and a batched inference stage, each its own processes (Rust HTTP front).

Run (in .venv-peers): ``python bench/peers/mosec_server.py --port 8000``. Tuning (environment):
BENCH_DECODE_WORKERS (2) decode processes, BENCH_WORKERS (2) inference processes, BENCH_MAX_BATCH (64)
and BENCH_BATCH_TIMEOUT_MS (2) of the inference stage's dynamic batching; BENCH_MODE ``per_prompt`` or
``gather`` as in bench/peers/model.py. See bench/peers/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: service.engine, bench.peers

import torch
from mosec import Server, Worker

from bench.peers.model import PromptedModel, from_env, mode

ROUTE = "/v1/predict"
Item = tuple[str, torch.Tensor, int]  # (prompt, images [N, 3, H, W], top_k)


class Decode(Worker):
    """JSON body -> (prompt, normalised images, top_k); runs in parallel with inference."""

    def __init__(self) -> None:
        super().__init__()
        self.model: PromptedModel = from_env()

    def forward(self, data: dict[str, Any]) -> Item:
        return self.model.prompt_of(data), self.model.decode(data["images"]), int(data.get("top_k", 5))


class Infer(Worker):
    """A dynamic batch of decoded requests -> one response per request."""

    def __init__(self) -> None:
        super().__init__()
        self.model: PromptedModel = from_env()
        self.gather = mode() == "gather"

    def forward(self, items: list[Item]) -> list[dict[str, Any]]:
        return [{"predictions": p} for p in self.model.score_items(items, self.gather)]


if __name__ == "__main__":
    os.environ.setdefault("MOSEC_TIMEOUT", "60000")  # ms per request (mosec's default is 3 s)
    os.environ.setdefault("MOSEC_ADDRESS", "127.0.0.1")
    os.environ.setdefault("MOSEC_LOG_LEVEL", "warning")
    server = Server()
    server.append_worker(Decode, num=int(os.environ.get("BENCH_DECODE_WORKERS", "2")), route=ROUTE)
    server.append_worker(
        Infer,
        num=int(os.environ.get("BENCH_WORKERS", "2")),
        max_batch_size=int(os.environ.get("BENCH_MAX_BATCH", "64")),
        max_wait_time=int(os.environ.get("BENCH_BATCH_TIMEOUT_MS", "2")),
        route=ROUTE,
    )
    server.run()
