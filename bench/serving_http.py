"""HTTP part of the serving benchmark: `actprompt serve` in a subprocess, concurrent clients, several tenants.

Tenants and the backbone are created through the admin API and every prompt is imported through
``POST /v1/prompts`` (synthetic artifacts, no training), so the numbers include auth, the database
lookup of each prompt, image decoding, the micro-batcher and JSON encoding.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.serving import pct
from bench.synthetic import random_artifact
from service.engine import BackboneSpec, create_backbone

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Server:
    """`actprompt serve` on a free port with a throw-away SQLite database and a known admin key."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="actprompt-http-bench-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = "bench-admin-key-0123456789"
        env = {
            **os.environ,
            "ACTPROMPT_DATABASE_URL": f"sqlite:///{self.tmp / 'actprompt.db'}",
            "ACTPROMPT_VAR_DIR": str(self.tmp / "var"),
            "ACTPROMPT_ADMIN_KEY": self.admin_key,
            "ACTPROMPT_DEVICE": "cpu",
            "ACTPROMPT_DATA_ROOTS": str(self.tmp),
            "ACTPROMPT_LOG_LEVEL": "WARNING",
            "ACTPROMPT_RATE_LIMIT_PER_SECOND": "100000",
            "ACTPROMPT_RATE_LIMIT_BURST": "100000",
            **(extra_env or {}),
        }
        env.pop("ACTPROMPT_BROKER_URL", None)
        exe = Path(sys.executable).parent / "actprompt"
        self.log_path = self.tmp / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--port", str(self.port)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def setup_tenants_and_prompts(
    server: Server, spec: BackboneSpec, *, tenants: int, prompts: int
) -> list[tuple[str, str]]:
    """Creates tenants, registers the backbone, imports synthetic prompts; returns (api key, prompt id)."""
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        keys = []
        for i in range(tenants):
            r = c.post("/v1/tenants", json={"name": f"bench-{i}"}, headers=admin)
            r.raise_for_status()
            keys.append(r.json()["api_key"])
        body = {"id": "bench-backbone", "model": spec.model, "weights": spec.weights}
        c.post("/v1/backbones", json=body, headers=admin).raise_for_status()
        bb = create_backbone(spec, "cpu")
        layers = sorted({bb.recommended_layer, max(1, bb.num_layers // 2), bb.num_layers, 1})
        out = []
        for i in range(prompts):
            art = random_artifact(bb, layers=[layers[i % len(layers)]], num_classes=10, seed=i)
            key = keys[i % tenants]
            files = {"artifact": (f"p{i}.safetensors", art.to_bytes(), "application/octet-stream")}
            r = c.post("/v1/prompts", files=files, headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
            out.append((key, r.json()["id"]))
    return out


async def _load(
    url: str,
    prompts: list[tuple[str, str]],
    images: list[str],
    *,
    clients: int,
    per_client: int,
    images_per_request: int,
) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(per_client):
                key, pid = rng.choice(prompts)
                body = {"prompt": pid, "images": rng.sample(images, images_per_request), "top_k": 3}
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {key}"})
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == images_per_request
                    if not ok:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def run_http_bench(
    spec: BackboneSpec, key: str, *, quick: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    tenants, n_prompts = (3, 12) if quick else (4, 48)
    clients, per_client = (8, 10) if quick else (16, 25)
    images_per_request = 1
    server = Server()
    try:
        server.wait_ready()
        prompts = setup_tenants_and_prompts(server, spec, tenants=tenants, prompts=n_prompts)
        log(
            f"http {key}: server up, {tenants} tenants, {n_prompts} prompts imported through POST /v1/prompts"
        )
        h, w = spec.resolved().input_size or (32, 32)
        images = [base64.b64encode(_png(i, (h, w))).decode() for i in range(32)]
        # warm-up: every prompt once (cold loads from the database), not measured
        asyncio.run(
            _load(server.url, prompts, images, clients=4, per_client=n_prompts // 4, images_per_request=1)
        )
        metrics_before = httpx.get(f"{server.url}/metrics").text
        lat, errors, wall = asyncio.run(
            _load(
                server.url,
                prompts,
                images,
                clients=clients,
                per_client=per_client,
                images_per_request=images_per_request,
            )
        )
        metrics_after = httpx.get(f"{server.url}/metrics").text
        rows = _metric_sum(metrics_after, "actprompt_serving_batch_rows_sum") - _metric_sum(
            metrics_before, "actprompt_serving_batch_rows_sum"
        )
        batches = _metric_sum(metrics_after, "actprompt_serving_batch_rows_count") - _metric_sum(
            metrics_before, "actprompt_serving_batch_rows_count"
        )
        n = clients * per_client
        out = {
            "clients": clients,
            "tenants": tenants,
            "prompts": n_prompts,
            "requests": n,
            "images_per_request": images_per_request,
            "throughput_rps": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * pct(lat, 50), 2),
            "p95_ms": round(1000 * pct(lat, 95), 2),
            "p99_ms": round(1000 * pct(lat, 99), 2),
            "errors": len(errors),
            "error_examples": errors[:3],
            "mean_batch_rows": round(rows / batches, 2) if batches else None,
        }
        log(
            f"http {key}: {out['throughput_rps']} req/s, p50 {out['p50_ms']} ms, p95 {out['p95_ms']} ms, "
            f"p99 {out['p99_ms']} ms, errors {out['errors']}, mean batch {out['mean_batch_rows']} rows"
        )
        return out
    finally:
        server.stop()
