"""actprompt beside the serving frameworks a user would pick instead, under the same load, in one run.

    python -m bench.serving_peers [--quick] [--results bench/results/serving.json] [--servers a,b]

Every server (bench/peers/: LitServe, Ray Serve, mosec, a minimal FastAPI app; and ``actprompt serve``)
serves the same ResNet-20 with the same prompts (an activation delta at the recommended layer and a
43-class head: the very artifact bytes actprompt imports through ``POST /v1/prompts``), decodes the same
JSON-base64 PNG bodies and is probed for the same top-1 before it is measured. Workloads:

- ``one_prompt_{1,8,32}``: one prompt, 1/8/32 images per request, wrk (closed loop) per connection
  count; the best point is the saturation; then an open-loop run at 70 % of it (``p99_at_70pct_ms``);
- ``many_prompts``: 1,000 prompts over 20 tenants, Zipf(1.1) popularity, 1 image per request (peers:
  each prompt a model; ``litserve_gather``: the per-row gather written by hand);
- ``overload`` (actprompt): open-loop arrivals at 0.5x..3x its one-image saturation (bench/openloop.py).

The CPU time of each server's whole process tree is measured around every run (``cpu_ms_per_request``,
with a per-process breakdown in the details). Writes the ``peers`` and ``overload`` keys of serving.json
(read-modify-write: other keys survive) and the details + figure under ``<out>/serving_peers/``.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psutil

from bench.common import REPO_ROOT, WEIGHTS_DIR, log, read_json, write_json
from bench.openloop import build_request, cpu_share, generator_priority, run_open_loop, summarize
from bench.provenance import code_identity, now, provenance
from bench.serving_http import Server, _png, create_tenants
from bench.synthetic import random_artifact
from bench.wrk import Request, run_wrk
from service.engine import BackboneSpec, create_backbone

SERVERS = ("actprompt", "litserve", "ray_serve", "mosec", "minimal")
WORKLOADS = ("one_prompt_1", "one_prompt_8", "one_prompt_32", "many_prompts")
OVERLOAD_FACTORS = (0.5, 1.0, 1.5, 2.0, 3.0)
PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
NUM_CLASSES = 43
TOP_K = 3

#: How each peer is tuned for 2 cores (environment of its script; see bench/peers/README.md).
TUNING: dict[str, dict[str, str]] = {
    "litserve": {"BENCH_WORKERS": "2", "BENCH_MAX_BATCH": "64", "BENCH_BATCH_TIMEOUT_MS": "2"},
    "litserve_gather": {
        "BENCH_WORKERS": "2",
        "BENCH_MAX_BATCH": "64",
        "BENCH_BATCH_TIMEOUT_MS": "2",
        "BENCH_MODE": "gather",
    },
    "ray_serve": {"BENCH_WORKERS": "2", "BENCH_MAX_BATCH": "64", "BENCH_BATCH_TIMEOUT_MS": "2"},
    "mosec": {
        "BENCH_DECODE_WORKERS": "2",
        "BENCH_WORKERS": "2",
        "BENCH_MAX_BATCH": "64",
        "BENCH_BATCH_TIMEOUT_MS": "2",
    },
    "minimal": {"BENCH_WORKERS": "2"},
    "actprompt": {},
}
SCRIPTS = {
    "litserve": "litserve_server.py",
    "litserve_gather": "litserve_server.py",
    "ray_serve": "ray_server.py",
    "mosec": "mosec_server.py",
    "minimal": "minimal_server.py",
}


@dataclass(frozen=True)
class Plan:
    """How long each part runs: the default fits ~15 min of a quiet 2-core CPU; quick proves the paths."""

    connections: tuple[int, ...]
    seconds: float
    prompts: int
    tenants: int
    many_requests: int
    p70_seconds: float
    overload_seconds: float
    overload_timeout: float
    start_timeout: float = 240.0
    warmup_seconds: float = 8.0  # every prompt of the mix once before anything is measured


DEFAULT = Plan((16, 64), 6.0, 1000, 20, 4000, 8.0, 10.0, 10.0)
QUICK = Plan((8,), 2.0, 24, 4, 200, 2.0, 2.0, 5.0, warmup_seconds=2.0)


@dataclass
class Corpus:
    """The prompts (artifact bytes), the images and the reference top-1 every server must reproduce."""

    spec: BackboneSpec
    artifacts: list[bytes]
    pngs: list[bytes]
    zipf: list[int]  # prompt index of each many-prompt request
    reference: dict[int, list[int]] = field(default_factory=dict)  # prompt -> top-1 per probe image

    @property
    def b64(self) -> list[str]:
        return [base64.b64encode(p).decode() for p in self.pngs]


def make_corpus(plan: Plan, seed: int = 0) -> Corpus:
    spec = BackboneSpec("resnet20_cifar", weights=(WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri())
    bb = create_backbone(spec, "cpu")
    layer = bb.recommended_layer
    arts = [
        random_artifact(bb, layers=[layer], num_classes=NUM_CLASSES, seed=i).to_bytes()
        for i in range(plan.prompts)
    ]
    h, w = bb.input_size
    pngs = [_png(i, (h, w)) for i in range(64)]
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, plan.prompts + 1) ** 1.1
    zipf = rng.choice(plan.prompts, size=plan.many_requests, p=weights / weights.sum()).tolist()
    return Corpus(spec, arts, pngs, [int(k) for k in zipf])


def reference_top1(corpus: Corpus, prompts_dir: Path, probe: Sequence[int]) -> dict[int, list[int]]:
    """What every server must answer: top-1 of each probe prompt on the first 4 images (engine code)."""
    from bench.peers.model import PromptedModel

    model = PromptedModel(corpus.spec.weights or "", prompts_dir)
    x = model.decode(corpus.b64[:4])
    return {k: model.forward_one(f"p{k}", x).argmax(-1).tolist() for k in probe}


# --- servers ------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A started server and how to address prompt k on it (body field, headers)."""

    name: str
    server: Server
    prompt_ids: list[str]
    auth: list[str]  # per prompt: the Authorization header ("" for peers)
    multiplexed: bool = False  # Ray: the prompt also travels as serve_multiplexed_model_id

    def body(self, k: int, images: list[str]) -> tuple[bytes, tuple[tuple[str, str], ...], str]:
        doc = {"prompt": self.prompt_ids[k], "images": images, "top_k": TOP_K}
        headers = (("serve_multiplexed_model_id", self.prompt_ids[k]),) if self.multiplexed else ()
        return orjson.dumps(doc), headers, self.auth[k]

    def wrk_requests(self, ks: Sequence[int], b64: list[str], n_images: int) -> list[Request]:
        out = []
        for j, k in enumerate(ks):
            imgs = [b64[(j + i) % len(b64)] for i in range(n_images)]
            body, headers, auth = self.body(k, imgs)
            out.append(Request(body, "application/json", auth, headers))
        return out

    def raw_requests(self, ks: Sequence[int], b64: list[str], n_images: int) -> list[bytes]:
        host = f"127.0.0.1:{self.server.port}"
        out = []
        for r in self.wrk_requests(ks, b64, n_images):
            headers = [*r.headers, *((("Authorization", r.authorization),) if r.authorization else ())]
            out.append(build_request(host, "/v1/predict", r.body, headers))
        return out

    def predict(self, k: int, images: list[str]) -> list[int]:
        body, headers, auth = self.body(k, images)
        hdrs = {"Content-Type": "application/json", **dict(headers)}
        if auth:
            hdrs["Authorization"] = auth
        r = httpx.post(f"{self.server.url}/v1/predict", content=body, headers=hdrs, timeout=60)
        r.raise_for_status()
        return [row[0]["index"] for row in r.json()["predictions"]]

    def drain(self, image: str, tries: int = 60) -> None:
        """Wait until a request is answered: what a previous run left queued is then done (503 = retry)."""
        for _ in range(tries):
            try:
                self.predict(0, [image])
                return
            except httpx.HTTPStatusError as e:
                if e.response.status_code != 503:
                    raise
                time.sleep(0.5)
        raise RuntimeError(f"{self.name}: still refusing after {tries} tries")


def keep_log(server: Server, logs: Path, name: str) -> Path:
    """Copy a server's log into `logs` (before stop() removes its folder); returns the copy."""
    logs.mkdir(parents=True, exist_ok=True)
    kept = logs / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    shutil.copyfile(server.log_path, kept)
    return kept


def ready_or_stop(server: Server, name: str, logs: Path, start: Callable[[], None]) -> None:
    """Run `start` (readiness, set-up); on any failure keep the log, stop the tree, and say where."""
    try:
        start()
    except Exception as exc:
        kept = keep_log(server, logs, f"{name}-start-failed")
        server.stop()
        raise RuntimeError(f"{name} did not start: {exc} (its log: {kept})") from exc


def start_peer(name: str, corpus_dir: Path, corpus: Corpus, python: Path, plan: Plan, logs: Path) -> Target:
    env = {
        "BENCH_WEIGHTS": corpus.spec.weights or "",
        "BENCH_PROMPTS": str(corpus_dir),
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        **TUNING[name],
    }
    server = Server(extra_env=env, command=[str(python), str(REPO_ROOT / "bench" / "peers" / SCRIPTS[name])])
    target = Target(
        name,
        server,
        [f"p{k}" for k in range(len(corpus.artifacts))],
        [""] * len(corpus.artifacts),
        multiplexed=name == "ray_serve",
    )
    ready_or_stop(
        server,
        name,
        logs,
        lambda: server.wait_ready(timeout=plan.start_timeout, probe=lambda: _answers(target, corpus)),
    )
    return target


def _answers(target: Target, corpus: Corpus) -> bool:
    try:
        target.predict(0, corpus.b64[:1])
        return True
    except httpx.HTTPStatusError:
        return False


def start_actprompt(
    corpus: Corpus, plan: Plan, logs: Path, extra_env: dict[str, str] | None = None
) -> Target:
    """`actprompt serve` (its defaults) with every prompt imported through the API, 20 tenants."""
    server = Server(extra_env=extra_env)
    ids: list[str] = []
    keys: list[str] = []

    def start() -> None:
        server.wait_ready(timeout=plan.start_timeout)
        keys.extend(create_tenants(server, corpus.spec, plan.tenants))
        t0 = time.perf_counter()

        def one(k: int) -> str:
            files = {"artifact": (f"p{k}.safetensors", corpus.artifacts[k], "application/octet-stream")}
            headers = {"Authorization": f"Bearer {keys[k % len(keys)]}"}
            for attempt in range(5):
                r = httpx.post(f"{server.url}/v1/prompts", files=files, headers=headers, timeout=120)
                if r.status_code != 503:
                    break
                time.sleep(0.5 * (attempt + 1))
            r.raise_for_status()
            return str(r.json()["id"])

        with ThreadPoolExecutor(4) as pool:
            ids.extend(pool.map(one, range(len(corpus.artifacts))))
        log(
            f"actprompt: {len(ids)} prompts imported over {len(keys)} tenants "
            f"in {time.perf_counter() - t0:.0f} s"
        )

    ready_or_stop(server, "actprompt", logs, start)
    auth = [f"Bearer {keys[k % len(keys)]}" for k in range(len(ids))]
    return Target("actprompt", server, ids, auth)


# --- measuring ----------------------------------------------------------------------------------------


class TreeCPU:
    """CPU seconds of a process and all its descendants, per process, between two snapshots."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)

    def snapshot(self) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = (_label(p), t.user + t.system)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def diff(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
        """CPU seconds per process label (processes born meanwhile count whole)."""
        out: dict[str, float] = {}
        for pid, (label, cpu) in after.items():
            used = cpu - (before[pid][1] if pid in before else 0.0)
            out[label] = out.get(label, 0.0) + max(0.0, used)
        return out

    @staticmethod
    def busiest(
        before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float, n: int = 4
    ) -> list[dict[str, Any]]:
        """The ``n`` processes that used the most cores meanwhile, each with its role in an actprompt server
        ("engine", "front", "supervisor") or its label: which process a saturated server is bound by."""
        used = [
            (pid, label, cpu - (before[pid][1] if pid in before else 0.0))
            for pid, (label, cpu) in after.items()
        ]
        used.sort(key=lambda t: -t[2])
        return [
            {"pid": pid, "role": _role(pid, label), "cores": round(max(0.0, cpu) / max(seconds, 1e-9), 3)}
            for pid, label, cpu in used[:n]
        ]

    def rss(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total


def _role(pid: int, label: str) -> str:
    """actprompt's processes by what they do: its engine is a forkserver's child, its fronts are uvicorn's
    spawned workers (or, with one worker, the ``actprompt serve`` process itself, otherwise the supervisor);
    a peer's processes keep their label."""
    try:
        parent = psutil.Process(pid).parent()
        parent_cmd = " ".join(parent.cmdline()) if parent is not None else ""
    except psutil.Error:
        parent_cmd = ""
    if "multiprocessing.forkserver" in parent_cmd:
        return "engine"
    if "spawn_main" in label:
        return "front"
    if label.startswith("actprompt"):  # with --workers 1 uvicorn serves the app in this very process
        try:
            children = psutil.Process(pid).children()
            spawned = any("spawn_main" in " ".join(c.cmdline()) for c in children)
        except psutil.Error:
            spawned = True
        return "supervisor" if spawned else "front"
    return label


def _label(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        cmd = []
    tail = " ".join(a for a in cmd[1:4] if not a.startswith("--"))[-60:]
    return f"{p.name()} {tail}".strip()


def closed_loop(
    target: Target,
    requests: list[Request],
    n_images: int,
    plan: Plan,
    cpu: TreeCPU,
    barrier: Callable[[], object],
) -> dict[str, Any]:
    """wrk per connection count; the point with the most images/s is the saturation."""
    points = []
    for c in plan.connections:
        before = cpu.snapshot()
        res = run_wrk(target.server.url, "/v1/predict", requests, connections=c, seconds=plan.seconds)
        by_proc = TreeCPU.diff(before, cpu.snapshot())
        barrier()  # one request, answered once the requests wrk left queued are done
        res["images_per_s"] = round(res["rps"] * n_images, 1)
        res["server_cpu_s"] = {k: round(v, 3) for k, v in sorted(by_proc.items(), key=lambda kv: -kv[1])}
        total = sum(by_proc.values())
        answered = res["requests"] - res["errors"]  # per answer: refusals must not dilute a server's cost
        res["cpu_ms_per_request"] = round(1000 * total / answered, 2) if answered > 0 else None
        points.append(res)
    best = max(points, key=lambda p: p["images_per_s"])
    return {
        "images_per_s": best["images_per_s"],
        "p50_ms": best["p50_ms"],
        "p99_ms": best["p99_ms"],
        "errors": sum(p["errors"] for p in points),
        "cpu_ms_per_request": best["cpu_ms_per_request"],
        "rps": best["rps"],
        "connections": best["connections"],
        "curve": points,
    }


def open_loop(
    target: Target, raw: list[bytes], rate: float, seconds: float, timeout: float, saturation: float
) -> dict[str, Any]:
    with generator_priority() as nice, cpu_share() as share:
        records, lateness, secs = run_open_loop(
            target.server.url, raw, rate=rate, seconds=seconds, timeout=timeout, seed=int(rate)
        )
    out = summarize(records, lateness, secs, saturation_rps=saturation)
    out["generator_cpu_cores"] = share["cores"]
    out["generator_nice"] = nice
    return out


def check_top1(target: Target, corpus: Corpus) -> None:
    """The server answers the reference top-1 for every probe prompt (else its numbers mean nothing)."""
    for k, want in corpus.reference.items():
        got = target.predict(k, corpus.b64[:4])
        if got != want:
            raise RuntimeError(f"{target.name}: prompt {k} top-1 {got} != reference {want}")


def measure(target: Target, corpus: Corpus, plan: Plan, workloads: Sequence[str]) -> dict[str, Any]:
    check_top1(target, corpus)
    cpu = TreeCPU(target.server.proc.pid)
    b64 = corpus.b64
    out: dict[str, Any] = {"top1_matches_reference": True, "tuning": TUNING[target.name]}
    # warm-up: every prompt of the many-prompt mix once, and each request size (not measured)
    warm = target.wrk_requests(sorted(set(corpus.zipf)), b64, 1)
    run_wrk(target.server.url, "/v1/predict", warm, connections=4, seconds=plan.warmup_seconds)
    for wl in workloads:
        if wl == "many_prompts":
            reqs, n = target.wrk_requests(corpus.zipf, b64, 1), 1
        else:
            n = int(wl.rsplit("_", 1)[1])
            reqs = target.wrk_requests([0] * 16, b64, n)
        res = closed_loop(target, reqs, n, plan, cpu, lambda: target.drain(b64[0]))
        if not res["images_per_s"]:
            raise RuntimeError(
                f"{target.name} {wl}: no request completed in {plan.seconds} s (server stalled)"
            )
        log(
            f"peers {target.name} {wl}: {res['images_per_s']} img/s (c={res['connections']}), p50 "
            f"{res['p50_ms']:.1f} / p99 {res['p99_ms']:.1f} ms, errors {res['errors']}, "
            f"cpu {res['cpu_ms_per_request']} ms/req"
        )
        if wl == "one_prompt_1":
            ol = open_loop(
                target,
                target.raw_requests([0] * 16, b64, 1),
                0.7 * res["rps"],
                plan.p70_seconds,
                plan.overload_timeout,
                res["rps"],
            )
            res["p99_at_70pct_ms"], res["p50_at_70pct_ms"] = ol["ok_p99_ms"], ol["ok_p50_ms"]
            res["at_70pct"] = ol
            target.drain(b64[0])
        out[wl] = res
    return out


def overload(target: Target, corpus: Corpus, plan: Plan, saturation_rps: float) -> dict[str, Any]:
    """Open-loop arrivals at multiples of the one-image saturation (requests/s); one prompt."""
    raw = target.raw_requests([0] * 16, corpus.b64, 1)
    cpu = TreeCPU(target.server.proc.pid)
    out: dict[str, Any] = {}
    for f in OVERLOAD_FACTORS:
        key = f"x{f:g}"
        before, t0 = cpu.snapshot(), time.perf_counter()
        res = open_loop(
            target, raw, f * saturation_rps, plan.overload_seconds, plan.overload_timeout, saturation_rps
        )
        res["wall_s"] = round(time.perf_counter() - t0, 3)
        res["server_cores"] = server_cores(before, cpu.snapshot(), res["wall_s"])
        res["factor"] = f
        out[key] = res
        log(
            f"overload {key}: offered {res['offered_rps']} req/s, goodput ratio {res['goodput_ratio']}, "
            "ok p99 "
            f"{res['ok_p99_ms']} ms, refused {res['refused']} (p99 {res['refusal_p99_ms']} ms), timeouts "
            f"{res['timeouts']}, conn errors {res['conn_errors']}, generator late p99 "
            f"{res['generator_lateness_p99_ms']} ms"
        )
        target.drain(corpus.b64[0])  # the next rate starts on an empty queue
    return out


def server_cores(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> dict[str, float]:
    """Cores each role of the server (engine, fronts, supervisor) used between two snapshots."""
    used: dict[str, float] = {}
    for p in TreeCPU.busiest(before, after, seconds, n=len(after)):
        used[p["role"]] = round(used.get(p["role"], 0.0) + p["cores"], 3)
    return used


def front_cost(rates: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """Front CPU per admitted and per refused predict: the fronts' CPU seconds at each overload rate, fitted
    (least squares, no intercept) on that rate's admitted and refused counts. What a refusal takes from the
    cores the engine needs; None with fewer than two rates that refused something."""
    rows = [
        (r["ok"], r["refused"], r["server_cores"].get("front", 0.0) * r["wall_s"])
        for r in rates.values()
        if "server_cores" in r
    ]
    if sum(1 for _, refused, _ in rows if refused) < 2:
        return None
    counts = np.array([[ok, refused] for ok, refused, _ in rows], dtype=float)
    used = np.array([c for _, _, c in rows], dtype=float)
    (admitted, refused), *_ = np.linalg.lstsq(counts, used, rcond=None)
    return {
        "front_ms_per_admitted": round(1000 * admitted, 3),
        "front_ms_per_refused": round(1000 * refused, 3),
    }


# --- the run ------------------------------------------------------------------------------------------


PEER_KEYS = ("images_per_s", "p50_ms", "p99_ms", "errors", "cpu_ms_per_request")
OVERLOAD_KEYS = ("goodput_ratio", "refusal_p99_ms", "ok_p99_ms", "timeouts", "conn_errors")


def run(
    plan: Plan,
    out_dir: Path,
    results: Path,
    servers: Sequence[str],
    peers_python: Path,
    *,
    budget_minutes: float | None = None,
) -> dict[str, Any]:
    started, identity = now(), code_identity()
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    corpus = make_corpus(plan)
    prompts_dir = Path(tempfile.mkdtemp(prefix="bench-peers-prompts-"))
    details: dict[str, Any] = {"plan": asdict(plan), "servers": {}, "failures": {}}
    try:
        for k, art in enumerate(corpus.artifacts):
            (prompts_dir / f"p{k}.safetensors").write_bytes(art)
        corpus.reference = reference_top1(corpus, prompts_dir, sorted({0, *corpus.zipf[:3]}))
        runs = [(s, [w for w in WORKLOADS]) for s in servers]
        if "litserve" in servers:
            runs.append(("litserve_gather", ["many_prompts"]))
        for name, workloads in runs:
            if budget_minutes is not None and (time.perf_counter() - t0) / 60 > budget_minutes:
                details["failures"][name] = f"skipped: the {budget_minutes:.0f}-minute budget was spent"
                log(f"peers: {name} skipped (budget)")
                continue
            target = None
            try:
                if name == "actprompt":
                    target = start_actprompt(corpus, plan, logs)
                else:
                    if not peers_python.exists() and name != "minimal":
                        raise RuntimeError(f"{peers_python} is missing: run `make peers-venv`")
                    python = peers_python if peers_python.exists() else Path(sys.executable)
                    target = start_peer(name, prompts_dir, corpus, python, plan, logs)
                log(f"peers: {name} up")
                res = measure(target, corpus, plan, workloads)
                if name == "actprompt":
                    res["overload"] = overload(target, corpus, plan, res["one_prompt_1"]["rps"])
                details["servers"][name] = res
            except Exception as exc:  # one server's failure must not lose the others' numbers
                kept = None
                if target is not None:
                    kept = keep_log(target.server, logs, f"{name}-failed")
                    target.server.stop()
                target = None
                details["failures"][name] = f"{type(exc).__name__}: {exc}"[-2000:] + (
                    f" (its log: {kept})" if kept else ""
                )
                log(f"peers: {name} FAILED: {details['failures'][name][-600:]}")
            finally:
                if target is not None:
                    target.server.stop(keep_log_in=logs)
    finally:
        shutil.rmtree(prompts_dir, ignore_errors=True)
    details["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out_dir / "serving_peers.json", details)
    plot(details, out_dir / "serving_peers.png")
    prov = provenance(
        started,
        identity=identity,
        extra={
            "quick": plan is QUICK,
            "plan": asdict(plan),
            "details": _rel(out_dir / "serving_peers.json"),
            "load_generators": "wrk (closed loop, prepared bodies) for the workloads; bench/openloop.py "
            "(open loop, Poisson arrivals, latency from the schedule) for 70 % load and overload",
            "failures": details["failures"],
        },
    )
    doc = read_json(results) if results.exists() else {}
    doc = doc if isinstance(doc, dict) else {}
    peers: dict[str, Any] = {}
    for wl in WORKLOADS:
        for name, res in details["servers"].items():
            if wl in res:
                cell = {k: res[wl][k] for k in PEER_KEYS}
                if "p99_at_70pct_ms" in res[wl]:
                    cell["p99_at_70pct_ms"] = res[wl]["p99_at_70pct_ms"]
                    cell["p50_at_70pct_ms"] = res[wl]["p50_at_70pct_ms"]
                peers.setdefault(wl, {})[name] = cell
    peers["tuning"] = {k: TUNING[k] for k in details["servers"]}
    peers["provenance"] = prov
    doc["peers"] = peers
    ap = details["servers"].get("actprompt") or {}
    if "overload" in ap:
        over: dict[str, Any] = {k: {m: v[m] for m in OVERLOAD_KEYS} for k, v in ap["overload"].items()}
        for k, v in ap["overload"].items():
            over[k]["generator_lateness_p99_ms"] = v["generator_lateness_p99_ms"]
            over[k]["refused_without_retry_after"] = v["refused_without_retry_after"]
            over[k]["server_cores"] = v["server_cores"]
            over[k]["generator_cores"] = v["generator_cpu_cores"]
        over["front_cost"] = front_cost(ap["overload"])
        over["saturation_rps"] = ap["one_prompt_1"]["rps"]
        over["provenance"] = prov
        doc["overload"] = over
    write_json(results, doc)
    return details


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def plot(details: dict[str, Any], path: Path) -> None:
    """Images/s per workload and server; overload goodput and latency against the offered load."""
    import matplotlib.pyplot as plt

    servers = details["servers"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    names = [*SERVERS, "litserve_gather"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        res = servers.get(name) or {}
        ys = [(res.get(wl) or {}).get("images_per_s", 0) for wl in WORKLOADS]
        ax.bar(np.arange(len(WORKLOADS)) + i * width, ys, width, label=name)
    labels = ["1 image", "8 images", "32 images", "1,000 prompts"]
    ax.set_xticks(np.arange(len(WORKLOADS)) + 0.4 - width / 2, labels)
    ax.set_ylabel("images/s at saturation")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in names:
        curve = ((servers.get(name) or {}).get("one_prompt_1") or {}).get("curve") or []
        if curve:
            ax.plot([p["images_per_s"] for p in curve], [p["p99_ms"] for p in curve], marker="o", label=name)
    ax.set_title("1 image/request, closed loop")
    ax.set_xlabel("images/s")
    ax.set_ylabel("p99 ms")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax = axes[2]
    over = (servers.get("actprompt") or {}).get("overload") or {}
    if over:
        xs = [v["factor"] for v in over.values()]
        ax.plot(
            xs, [v["goodput_ratio"] or 0 for v in over.values()], marker="o", label="goodput ÷ saturation"
        )
        ax.set_xlabel("offered load ÷ saturation")
        ax.set_ylabel("goodput ratio")
        ax2 = ax.twinx()
        ax2.plot(xs, [v["ok_p99_ms"] or np.nan for v in over.values()], "r--", marker="s", label="ok p99 ms")
        ax2.plot(
            xs, [v["refusal_p99_ms"] or np.nan for v in over.values()], "g:", marker="^", label="503 p99 ms"
        )
        ax2.set_yscale("log")
        ax2.legend(fontsize=7, loc="lower right")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title("actprompt, open loop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="seconds per point, 24 prompts: proves the paths"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="details folder (default <results dir>/serving_peers)"
    )
    parser.add_argument("--results", type=Path, default=None, help="serving.json to update (peers, overload)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {SERVERS}")
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no server after this")
    args = parser.parse_args(argv)
    from bench.common import results_dir, set_threads

    set_threads()
    base = results_dir(args.quick)
    results = args.results or base / "serving.json"
    out = args.out or results.parent / "serving_peers"
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}")
    details = run(
        QUICK if args.quick else DEFAULT,
        out,
        results,
        servers,
        args.peers_python,
        budget_minutes=args.budget_minutes,
    )
    return 1 if details["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- goals --------------------------------------------------------------------------------------------

Goal = tuple[str, str, str, bool | None]  # (goal, measured, target, met; None = not measured)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _goal(
    name: str,
    value: float | None,
    target: str,
    ok: Callable[[float], bool],
    fmt: str = "{:.2f}\N{MULTIPLICATION SIGN}",
) -> Goal:
    return (name, "—" if value is None else fmt.format(value), target, None if value is None else ok(value))


def goal_checks(doc: dict[str, Any]) -> list[Goal]:
    """Each serving goal of bench/GOALS.md against what serving.json holds (None: not measured)."""
    details_path = ((doc.get("http_vs_engine") or {}).get("provenance") or {}).get("details")
    http_details = read_json(REPO_ROOT / details_path) if details_path else None  # absolute stays absolute
    http_details = http_details if isinstance(http_details, dict) else None
    peers = doc.get("peers") or {}
    out: list[Goal] = []

    def img(wl: str, server: str) -> float | None:
        return ((peers.get(wl) or {}).get(server) or {}).get("images_per_s")

    users_way = ("litserve", "ray_serve", "mosec", "minimal")
    for wl in ("one_prompt_1", "one_prompt_8", "one_prompt_32"):
        best = max((v for s in users_way if (v := img(wl, s)) is not None), default=None)
        out.append(
            _goal(
                f"{wl}: actprompt ÷ best peer, images/s",
                _ratio(img(wl, "actprompt"), best),
                "≥ 1.0",
                lambda r: r >= 1.0,
            )
        )
    cell = peers.get("one_prompt_1") or {}
    p70 = [v["p99_at_70pct_ms"] for s, v in cell.items() if s in users_way and v.get("p99_at_70pct_ms")]
    ours = (cell.get("actprompt") or {}).get("p99_at_70pct_ms")
    out.append(
        _goal(
            "one image at 70 % load: actprompt p99 ÷ best peer's p99",
            _ratio(ours, min(p70, default=None)),
            "≤ 1.2",
            lambda r: r <= 1.2,
        )
    )
    out.append(
        _goal(
            "many prompts: actprompt ÷ litserve_gather",
            _ratio(img("many_prompts", "actprompt"), img("many_prompts", "litserve_gather")),
            "≥ 1.0",
            lambda r: r >= 1.0,
        )
    )
    for s in users_way:
        out.append(
            _goal(
                f"many prompts: actprompt ÷ {s}",
                _ratio(img("many_prompts", "actprompt"), img("many_prompts", s)),
                "≥ 1.5",
                lambda r: r >= 1.5,
            )
        )
    out.append(
        _goal(
            "actprompt: 1,000 prompts ÷ one prompt",
            _ratio(img("many_prompts", "actprompt"), img("one_prompt_1", "actprompt")),
            "≥ 0.9",
            lambda r: r >= 0.9,
        )
    )
    over = doc.get("overload") or {}
    for key in ("x2", "x3"):
        o = over.get(key) or {}
        out.append(
            _goal(
                f"overload {key}: goodput ÷ saturation", o.get("goodput_ratio"), "≥ 0.9", lambda r: r >= 0.9
            )
        )
        out.append(
            _goal(
                f"overload {key}: refusal p99",
                o.get("refusal_p99_ms"),
                "≤ 50 ms",
                lambda r: r <= 50,
                "{:.0f} ms",
            )
        )
        bad = (
            None
            if not o
            else o.get("timeouts", 0) + o.get("conn_errors", 0) + o.get("refused_without_retry_after", 0)
        )
        out.append(
            _goal(
                f"overload {key}: timeouts + conn errors + 503s without Retry-After",
                bad,
                "0",
                lambda r: r == 0,
                "{:.0f}",
            )
        )
    ap70 = cell.get("actprompt") or {}
    out.append(
        _goal(
            "actprompt at 70 % load: ok p99 ÷ p50",
            _ratio(ap70.get("p99_at_70pct_ms"), ap70.get("p50_at_70pct_ms")),
            "≤ 3",
            lambda r: r <= 3,
        )
    )
    soak = doc.get("soak") or {}
    out.append(
        _goal(
            "soak: resident memory growth after warm-up",
            soak.get("rss_growth"),
            "≤ 5 %",
            lambda r: r <= 0.05,
            "{:.1%}",
        )
    )
    out.append(_goal("soak: errors", soak.get("errors"), "0", lambda r: r == 0, "{:.0f}"))
    servers = (http_details or {}).get("servers") or {}
    sat1 = ((servers.get("embedded") or {}).get("json_1") or {}).get("saturation", {})
    w1 = sat1.get("images_per_s")
    w2 = ((servers.get("embedded_w2") or {}).get("json_1") or {}).get("saturation", {}).get("images_per_s")
    name, value, target, met = _goal(
        "--workers 2 ÷ --workers 1, one image", _ratio(w2, w1), "≥ 1.3", lambda r: r >= 1.3
    )
    cores = {p["role"]: p["cores"] for p in reversed(sat1.get("busiest_processes") or [])}
    if "front" in cores and "engine" in cores:  # a second front helps only where the one front is the bound
        value += f" (at --workers 1: the front {cores['front']:.2f} cores, the engine {cores['engine']:.2f})"
    out.append((name, value, target, met))
    http = doc.get("http_vs_engine") or {}
    out.append(_goal("HTTP ÷ bare engine, 1 image", http.get("1"), "≥ 0.5", lambda r: r >= 0.5))
    out.append(_goal("HTTP ÷ bare engine, 32 images", http.get("32"), "≥ 0.8", lambda r: r >= 0.8))
    return out
