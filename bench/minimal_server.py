"""The peer for bench/serving_http.py: the minimal single-model FastAPI server a user would write.

One backbone, one prompt artifact, one forward pass per request; no auth, no database, no batching, no
rate limit. Run: ``BENCH_WEIGHTS=file:///… BENCH_ARTIFACT=/x.safetensors uvicorn bench.minimal_server:app``.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.engine import BackboneSpec, create_backbone
from service.engine.artifacts import PromptArtifact
from service.engine.data import decode_image
from service.engine.mixed_batch import predict_single

backbone = create_backbone(BackboneSpec("resnet20_cifar", weights=os.environ["BENCH_WEIGHTS"]), "cpu")
artifact = PromptArtifact.from_bytes(Path(os.environ["BENCH_ARTIFACT"]).read_bytes())
preprocessing = artifact.preprocessing(backbone)
app = FastAPI()


class Body(BaseModel):
    images: list[str]
    top_k: int = 5


def _run(images: list[bytes], top_k: int) -> list[list[dict[str, Any]]]:
    x = preprocessing([decode_image(b) for b in images])
    with torch.inference_mode():
        probs = torch.softmax(predict_single(backbone, artifact, x), dim=-1)
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    return [
        [{"label": artifact.classes[j], "index": j, "probability": p} for p, j in zip(vs, ix, strict=True)]
        for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
    ]


@app.post("/v1/predict")
async def predict(body: Body) -> dict[str, Any]:
    images = [base64.b64decode(s) for s in body.images]
    return {"predictions": await run_in_threadpool(_run, images, body.top_k)}
