"""HTTP part of the serving benchmark: `actprompt serve` in a subprocess, concurrent clients, several tenants.

Tenants and the backbone are created through the admin API and every prompt is imported through
``POST /v1/prompts`` (synthetic artifacts, no training), so the numbers include auth, the database
lookup of each prompt, image decoding, the micro-batcher and JSON encoding.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image

from bench.serving import pct
from bench.synthetic import random_artifact
from service.engine import BackboneSpec, create_backbone

if TYPE_CHECKING:
    from bench.serving_peers import TreeCPU

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

    def __init__(
        self,
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
        command: list[str] | None = None,
    ) -> None:
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
        cmd = command or [str(exe), "serve"]
        # Its own session: stop() ends the whole process tree (workers, a framework's helpers) at once.
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port), *(args or [])],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )

    def wait_ready(
        self, timeout: float = 120.0, path: str = "/readyz", probe: Callable[[], bool] | None = None
    ) -> None:
        """Until GET `path` answers 200/405, or `probe()` is true (a real request answered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            try:
                if probe() if probe else httpx.get(f"{self.url}{path}", timeout=2).status_code in (200, 405):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not become ready in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log (all its processes write there); empty once stop() removed it."""
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, keep_log_in: Path | None = None) -> Path | None:
        """Stop the server and remove its folder; if it had already exited on its own, first copy its
        log into `keep_log_in` (the only record of why) and return that copy's path."""
        exited = self.proc.poll()
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        time.sleep(0.2)
        self._signal_group(signal.SIGKILL)  # helpers that outlived the leader (a framework's daemons)
        self._log.close()
        kept = None
        if exited is not None and keep_log_in is not None:
            keep_log_in.mkdir(parents=True, exist_ok=True)
            kept = keep_log_in / f"server-died-{time.strftime('%Y%m%dT%H%M%S')}-rc{exited}.log"
            shutil.copyfile(self.log_path, kept)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return kept


def create_tenants(server: Server, spec: BackboneSpec, tenants: int) -> list[str]:
    """Creates `tenants` tenants and registers the backbone as ``bench-backbone``; returns the API keys."""
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        keys = []
        for i in range(tenants):
            r = c.post("/v1/tenants", json={"name": f"bench-{i}"}, headers=admin)
            r.raise_for_status()
            keys.append(r.json()["api_key"])
        body = {"id": "bench-backbone", "model": spec.model, "weights": spec.weights}
        c.post("/v1/backbones", json=body, headers=admin).raise_for_status()
    return keys


def setup_tenants_and_prompts(
    server: Server, spec: BackboneSpec, *, tenants: int, prompts: int
) -> list[tuple[str, str]]:
    """Creates tenants, registers the backbone, imports synthetic prompts; returns (api key, prompt id)."""
    keys = create_tenants(server, spec, tenants)
    with httpx.Client(base_url=server.url, timeout=120) as c:
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


# ---------------------------------------------------------------------------------------------------------
# HTTP images/s through `actprompt serve` against the bare engine, with wrk as the load generator.
#
#   python -m bench.serving_http [--quick] [--out DIR] [--results bench/results/serving.json]
# ---------------------------------------------------------------------------------------------------------

IMAGES_PER_REQUEST = (1, 8, 32)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def engine_rates(spec: BackboneSpec, *, quick: bool) -> dict[str, dict[str, float]]:
    """Bare backbone (+ a linear head) images/s per torch thread count and batch size, best of a few reps."""
    import torch

    bb = create_backbone(spec, "cpu")
    head = torch.nn.Linear(bb.num_features, 10)
    out: dict[str, dict[str, float]] = {}
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rates: dict[str, float] = {}
        for bs in BATCH_SIZES:
            x = torch.randn(bs, 3, *bb.input_size)  # [B, 3, H, W]
            iters = max(3, (64 if quick else 256) // bs)
            best = float("inf")
            with torch.inference_mode():
                head(bb.forward_features(x))
                for _ in range(3 if quick else 5):
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        head(bb.forward_features(x))
                    best = min(best, (time.perf_counter() - t0) / iters)
            rates[str(bs)] = round(bs / best, 1)
        out[str(threads)] = rates
    torch.set_num_threads(before)
    return out


def engine_rate_at(rates: dict[str, dict[str, float]], rows: float) -> tuple[float, int]:
    """The best bare rate on these cores at the batch size nearest (in log scale) to ``rows``."""
    bs = min(BATCH_SIZES, key=lambda b: abs(np.log2(b) - np.log2(max(1.0, rows))))
    return max(r[str(bs)] for r in rates.values()), bs


def _multipart(fields: list[tuple[str, str]], files: list[bytes]) -> tuple[bytes, str]:
    boundary = "benchboundary7MA4YWxkTrZu0gW"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields
    ]
    for i, data in enumerate(files):
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="i{i}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        parts.append(head + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def prepared_requests(
    prompts: list[tuple[str, str]], pngs: list[bytes], n_images: int, encoding: str, *, peer: bool = False
) -> list[Any]:
    """One body per prompt (cycled by wrk), each with its tenant's key: JSON-base64 or multipart."""
    import orjson

    from bench.wrk import Request

    out = []
    for k, (key, pid) in enumerate(prompts):
        imgs = [pngs[(k + j) % len(pngs)] for j in range(n_images)]
        b64 = [base64.b64encode(b).decode() for b in imgs]
        if encoding == "json":
            body: dict[str, Any] = {"images": b64, "top_k": 3}
            if not peer:
                body["prompt"] = pid
            out.append(Request(orjson.dumps(body), "application/json", "" if peer else f"Bearer {key}"))
        else:
            data, ctype = _multipart([("prompt", pid), ("top_k", "3")], imgs)
            out.append(Request(data, ctype, f"Bearer {key}"))
    return out


def _batch_rows(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return _metric_sum(text, "actprompt_serving_batch_rows_sum"), _metric_sum(
        text, "actprompt_serving_batch_rows_count"
    )


def sweep(
    url: str,
    requests: list[Any],
    n_images: int,
    connections: list[int],
    seconds: float,
    *,
    metrics: bool,
    cpu: TreeCPU | None = None,
) -> list[dict[str, Any]]:
    """A closed-loop run per connection count: the throughput-latency curve of one configuration (with
    ``cpu``, the server's busiest processes at each point)."""
    from bench.wrk import run_wrk

    points = []
    for c in connections:
        before = _batch_rows(url) if metrics else (0.0, 0.0)
        cpu_before = cpu.snapshot() if cpu is not None else {}
        t0 = time.perf_counter()
        res = run_wrk(url, "/v1/predict", requests, connections=c, seconds=seconds)
        if cpu is not None:  # which process bounds a saturated server (e.g. one front with --workers 1)
            res["busiest_processes"] = cpu.busiest(cpu_before, cpu.snapshot(), time.perf_counter() - t0)
        if metrics:
            after = _batch_rows(url)
            batches = after[1] - before[1]
            res["mean_batch_rows"] = round((after[0] - before[0]) / batches, 2) if batches else None
        res["images_per_s"] = round(res["rps"] * n_images, 1)
        points.append(res)
    return points


def cold_and_warm(server: Server, prompts: list[tuple[str, str]], png: bytes) -> dict[str, Any]:
    """First request of every prompt after start (prompt cache empty: DB read + decode + slot write), then
    the same requests again (resident): sequential, one at a time, so each latency is one request's."""
    body = {"images": [base64.b64encode(png).decode()], "top_k": 3}
    out: dict[str, Any] = {}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for phase in ("cold", "warm"):
            lat = []
            for key, pid in prompts:
                t0 = time.perf_counter()
                r = c.post(
                    "/v1/predict", json={**body, "prompt": pid}, headers={"Authorization": f"Bearer {key}"}
                )
                lat.append(time.perf_counter() - t0)
                r.raise_for_status()
            out[phase] = {"p50_ms": round(1000 * pct(lat, 50), 2), "p99_ms": round(1000 * pct(lat, 99), 2)}
    return out


def _postgres_env() -> tuple[dict[str, str], Callable[[], None]]:
    """A fresh PostgreSQL database and the shared Redis as broker and rate-limit store (production mode)."""
    import psycopg

    name = f"actprompt_bench_{os.getpid()}_{random.randrange(1 << 30)}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    env = {
        "ACTPROMPT_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        "ACTPROMPT_AUTO_MIGRATE": "true",
        "ACTPROMPT_BROKER_URL": "redis://127.0.0.1:6379/0",
        "ACTPROMPT_JOB_QUEUE": f"actprompt.bench.{name}",
    }
    return env, drop


def measure_gateway(
    label: str,
    spec: BackboneSpec,
    *,
    quick: bool,
    workers: int,
    production: bool,
    log: Callable[[str], None],
    conns: list[int],
    seconds: float,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    tenants, n_prompts = (4, 48)
    env, cleanup = _postgres_env() if production else ({}, lambda: None)
    server = Server(extra_env=env, args=["--workers", str(workers)])
    try:
        server.wait_ready()
        prompts = setup_tenants_and_prompts(server, spec, tenants=tenants, prompts=n_prompts)
        h, w = spec.resolved().input_size or (32, 32)
        pngs = [_png(i, (h, w)) for i in range(64)]
        out: dict[str, Any] = {"workers": workers, "production": production, "tenants": tenants}
        out["cold_warm"] = cold_and_warm(server, prompts, pngs[0])
        from bench.serving_peers import TreeCPU  # here: serving_peers imports this module

        cpu = TreeCPU(server.proc.pid)
        for enc in ("json", "multipart"):
            for n in IMAGES_PER_REQUEST:
                reqs = prepared_requests(prompts, pngs, n, enc)
                pts = sweep(server.url, reqs, n, conns, seconds, metrics=True, cpu=cpu)
                best = max(pts, key=lambda p: p["images_per_s"])
                out[f"{enc}_{n}"] = {"curve": pts, "saturation": best}
                log(
                    f"http {label} {enc} {n} img/req: {best['images_per_s']} img/s "
                    f"at c={best['connections']}, p50 {best['p50_ms']} ms p99 {best['p99_ms']} ms, "
                    f"batch {best.get('mean_batch_rows')} rows, "
                    f"errors {sum(p['errors'] for p in pts)}, wrk cpu {best['load_generator_cpu_share']}"
                )
        return out
    except Exception as exc:
        if server.proc.poll() is None:
            raise
        rc = server.proc.returncode
        raise RuntimeError(f"{label}: the server exited (rc {rc}); its log is kept in {log_dir}") from exc
    finally:
        server.stop(keep_log_in=log_dir)  # keeps the log only of a server that exited on its own
        cleanup()


def measure_peer(
    spec: BackboneSpec, *, log: Callable[[str], None], conns: list[int], seconds: float
) -> dict[str, Any]:
    """The minimal FastAPI peer (bench/peers/minimal_server.py, one process) under the same sweep."""
    bb = create_backbone(spec, "cpu")
    art = random_artifact(bb, layers=[bb.recommended_layer], num_classes=10, seed=0)
    prompts = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    (prompts / "p0.safetensors").write_bytes(art.to_bytes())
    cmd = [sys.executable, str(REPO / "bench" / "peers" / "minimal_server.py")]
    env = {"BENCH_WEIGHTS": spec.weights or "", "BENCH_PROMPTS": str(prompts), "BENCH_WORKERS": "1"}
    server = Server(extra_env=env, command=cmd)
    try:
        server.wait_ready(path="/v1/predict")
        h, w = spec.resolved().input_size or (32, 32)
        pngs = [_png(i, (h, w)) for i in range(64)]
        out: dict[str, Any] = {}
        for n in IMAGES_PER_REQUEST:
            reqs = prepared_requests([("", "")] * 8, pngs, n, "json", peer=True)
            pts = sweep(server.url, reqs, n, conns, seconds, metrics=False)
            best = max(pts, key=lambda p: p["images_per_s"])
            out[f"json_{n}"] = {"curve": pts, "saturation": best}
            log(f"http peer json {n} img/req: {best['images_per_s']} img/s, p50 {best['p50_ms']} ms")
        return out
    finally:
        server.stop()
        shutil.rmtree(prompts, ignore_errors=True)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(IMAGES_PER_REQUEST), figsize=(5 * len(IMAGES_PER_REQUEST), 4))
    for ax, n in zip(axes, IMAGES_PER_REQUEST, strict=True):
        for name, res in results["servers"].items():
            for enc in ("json", "multipart"):
                cell = res.get(f"{enc}_{n}")
                if cell:
                    pts = cell["curve"]
                    ax.plot(
                        [p["images_per_s"] for p in pts],
                        [p["p99_ms"] for p in pts],
                        marker="o",
                        label=f"{name} {enc}",
                    )
        ax.axvline(
            results["engine_at_batch"][str(n)]["images_per_s"], color="grey", ls="--", label="bare engine"
        )
        ax.set_title(f"{n} image(s) per request")
        ax.set_xlabel("images/s")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from bench.common import WEIGHTS_DIR, log, machine_info, read_json, write_json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, two connection counts")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serving_http")
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results" / "serving.json",
        help="serving.json whose `http_vs_engine` key is rewritten (only that key)",
    )
    parser.add_argument("--modes", default="embedded,embedded_w2,production,production_w2,peer")
    parser.add_argument(
        "--connections", default=None, help="comma list of wrk connection counts (the curve's points)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="wrk duration of each point")
    args = parser.parse_args(argv)
    conns = (
        [int(c) for c in args.connections.split(",")]
        if args.connections
        else ([4, 16] if args.quick else [1, 4, 16, 32, 64])
    )
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    modes = args.modes.split(",")
    spec = BackboneSpec("resnet20_cifar", weights=(WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri())
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    rates = engine_rates(spec, quick=args.quick)
    log(f"engine bare images/s (threads -> batch -> img/s): {rates}")
    servers: dict[str, Any] = {}
    configs = {  # name -> (API processes, production mode)
        "embedded": (1, False),
        "embedded_w2": (2, False),
        "production": (1, True),
        "production_w2": (2, True),
    }
    for name in modes:
        if name in configs:
            workers, production = configs[name]
            servers[name] = measure_gateway(
                name,
                spec,
                quick=args.quick,
                log=log,
                workers=workers,
                production=production,
                conns=conns,
                seconds=seconds,
                log_dir=args.out,
            )
    if "peer" in modes:
        servers["minimal_fastapi"] = measure_peer(spec, log=log, conns=conns, seconds=seconds)
    gateways = {k: v for k, v in servers.items() if k in configs}
    ratios: dict[str, Any] = {}
    engine_at: dict[str, Any] = {}
    for n in IMAGES_PER_REQUEST:
        best_name, best = max(
            ((k, v[f"json_{n}"]["saturation"]) for k, v in gateways.items()),
            key=lambda kv: kv[1]["images_per_s"],
        )
        rows = best.get("mean_batch_rows") or n
        engine, bs = engine_rate_at(rates, rows)
        engine_at[str(n)] = {
            "images_per_s": engine,
            "batch": bs,
            "mean_batch_rows": rows,
            "server": best_name,
        }
        ratios[str(n)] = round(best["images_per_s"] / engine, 3)
    results = {
        "engine_bare_images_per_s": rates,
        "engine_at_batch": engine_at,
        "servers": servers,
        "ratios": ratios,
        "load_average_at_start": [round(x, 2) for x in load],
    }
    write_json(args.out / "serving_http.json", results)
    plot_curves(results, args.out / "serving_http_curves.png")
    provenance = {
        "commit": _git_commit(),
        "machine": machine_info(),
        "load_average_at_start": results["load_average_at_start"],
        "quick": args.quick,
        "servers": {k: engine_at[k]["server"] for k in engine_at},
        "engine_batch": {k: engine_at[k]["batch"] for k in engine_at},
        "details": str((args.out / "serving_http.json").relative_to(REPO))
        if args.out.is_relative_to(REPO)
        else str(args.out / "serving_http.json"),
    }
    doc = read_json(args.results) if args.results.exists() else {}
    doc["http_vs_engine"] = {
        **ratios,
        "load_generator": "wrk 4.x (C, 1 thread, closed loop, prepared bodies via Lua); its CPU share is in "
        "the details per run",
        "provenance": provenance,
    }
    write_json(args.results, doc)
    log(f"http_vs_engine: {json.dumps(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
