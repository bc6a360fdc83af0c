"""The minimal FastAPI server a user would write: one forward pass per request, no batching.

No auth, no database, no rate limit. Run (in .venv-peers):
``python bench/peers/minimal_server.py --port 8000`` (BENCH_WORKERS uvicorn processes, default 2:
each loads the model; a request runs in the thread pool so the event loop keeps reading sockets).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: service.engine, bench.peers

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from bench.peers.model import PromptedModel, from_env

models: dict[str, PromptedModel] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    models["m"] = from_env()  # in each worker process, not in uvicorn's supervisor
    yield


app = FastAPI(lifespan=lifespan)


class Body(BaseModel):
    images: list[str]
    top_k: int = 5
    prompt: str | None = None


def _run(body: Body) -> list[list[dict[str, Any]]]:
    model = models["m"]
    prompt = model.prompt_of(body.model_dump())
    return model.shape(prompt, model.forward_one(prompt, model.decode(body.images)), body.top_k)


@app.post("/v1/predict")
async def predict(body: Body) -> dict[str, Any]:
    try:
        return {"predictions": await run_in_threadpool(_run, body)}
    except KeyError as e:
        raise HTTPException(404, str(e)) from e


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    workers = int(os.environ.get("BENCH_WORKERS", "2"))
    uvicorn.run(
        "bench.peers.minimal_server:app",
        host="127.0.0.1",
        port=args.port,
        workers=workers,
        log_level="warning",
        # uvicorn's supervisor restarts a worker that misses a 5-s ping: one still importing torch on a
        # busy box, or one whose GIL a forward pass holds, would be killed over and over
        timeout_worker_healthcheck=120,
    )
