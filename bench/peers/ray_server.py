"""Ray Serve peer: replicas with ``@serve.batch``; prompts as ``@serve.multiplexed`` models.

Run (in .venv-peers): ``python bench/peers/ray_server.py --port 8000`` (starts a local Ray, deploys,
then waits). Tuning (environment): BENCH_WORKERS replicas (2, one CPU each), BENCH_MAX_BATCH (64) and
BENCH_BATCH_TIMEOUT_MS (2) of ``@serve.batch``; ``max_ongoing_requests`` is set above the batch size
(Ray's default of 5 would cap every batch at 5). The prompt travels as the ``serve_multiplexed_model_id``
header (Ray's routing key) or, without it, in the body. See bench/peers/README.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: service.engine, bench.peers

import ray
import torch
from ray import serve
from starlette.requests import Request

ROOT = Path(__file__).resolve().parents[2]
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "64"))
WAIT_S = float(os.environ.get("BENCH_BATCH_TIMEOUT_MS", "2")) / 1000

Item = tuple[str, torch.Tensor, int]  # (prompt, images [N, 3, H, W], top_k)


@serve.deployment(
    num_replicas=WORKERS,
    max_ongoing_requests=4 * MAX_BATCH,
    ray_actor_options={"num_cpus": 1},
    # Ray's performance guide: no per-request access log on the hot path
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
)
class PromptModel:
    def __init__(self) -> None:
        from bench.peers.model import from_env

        self.model = from_env()

    @serve.multiplexed(max_num_models_per_replica=100_000)
    async def get_model(self, model_id: str) -> str:
        """Ray's per-replica model cache: every prompt is already loaded, so a hit returns its name."""
        self.model.prompt_of({"prompt": model_id})
        return model_id

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
    async def infer(self, items: list[Item]) -> list[list[list[dict[str, Any]]]]:
        return self.model.score_items(items, gather=False)

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        model_id = serve.get_multiplexed_model_id()
        prompt = await self.get_model(model_id) if model_id else self.model.prompt_of(body)
        x = self.model.decode(body["images"])
        return {"predictions": await self.infer((prompt, x, int(body.get("top_k", 5))))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=WORKERS,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        logging_level="WARNING",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(PromptModel.bind(), route_prefix="/v1/predict", name="peer")
    print(f"ray serve ready on {args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
