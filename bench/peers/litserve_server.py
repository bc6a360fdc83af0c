"""LitServe peer: dynamic batching across requests, ``workers_per_device`` inference processes.

Run (in .venv-peers): ``python bench/peers/litserve_server.py --port 8000``. Tuning (environment):
BENCH_WORKERS inference workers (2 = the cores), BENCH_MAX_BATCH requests per batch (64),
BENCH_BATCH_TIMEOUT_MS wait for a fuller batch (2), BENCH_API_SERVERS HTTP processes (LitServe's
default: as many as inference workers). BENCH_MODE: ``per_prompt`` (one forward per distinct prompt in a
batch) or ``gather`` (per-row gather by hand). See bench/peers/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: service.engine, bench.peers

import litserve as ls
import torch

from bench.peers.model import PromptedModel, from_env, mode

Item = tuple[str, torch.Tensor, int]  # (prompt, images [N, 3, H, W], top_k)


class PromptAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model: PromptedModel = from_env()
        self.gather = mode() == "gather"

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads the body type from a hint
        return (
            self.model.prompt_of(request),
            self.model.decode(request["images"]),
            int(request.get("top_k", 5)),
        )

    def batch(self, inputs: list[Item]) -> list[Item]:
        return inputs  # rows are concatenated in predict, where the prompts are known

    def predict(self, items: Any) -> Any:
        batched = isinstance(items, list)
        items = items if batched else [items]
        out = self.model.score_items(items, self.gather)
        return out if batched else out[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        return {"predictions": output}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    workers = int(os.environ.get("BENCH_WORKERS", "2"))
    api = PromptAPI(
        max_batch_size=int(os.environ.get("BENCH_MAX_BATCH", "64")),
        batch_timeout=float(os.environ.get("BENCH_BATCH_TIMEOUT_MS", "2")) / 1000,
        api_path="/v1/predict",
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=workers, timeout=60)
    api_servers = os.environ.get("BENCH_API_SERVERS")
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=int(api_servers) if api_servers else None,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
