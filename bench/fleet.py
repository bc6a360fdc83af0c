"""Prompt-affine routing against round robin over a real fleet: HAProxy, 3 `actprompt serve` replicas.

The fleet is `deploy/fleet.py` (PostgreSQL, Redis, HAProxy on the shipped `deploy/haproxy.cfg`, replicas as
separate processes). 10,000 prompts (synthetic artifacts, stored through the domain layer in bulk) are asked
for with Zipf(1.1) popularity; each replica's host prompt cache holds 40 % of them. Measured:

* per routing (round robin: `balance roundrobin`; affine: the shipped hash of X-Actprompt-Prompt): fleet
  cache hit rate from every replica's /metrics, cold loads/s, p50/p99 latency, images/s;
* a hot prompt with 50 % of the traffic: the busiest replica's share of the predicts (HAProxy's counters);
* one replica SIGKILLed mid-run: failed predicts, and the time until traffic and hit rate recover;
* a replica added (the spare slot api4): the time until it takes its share.

A predict is a cache hit unless its replica had to load the prompt: hit rate = 1 - cold loads (host-tier
misses, summed over the replicas' /metrics) per predict. It leaves out compulsory misses (a prompt's
first request in the run, which no routing can serve from a cache); the raw rate is reported beside it.

    python -m bench.fleet [--quick] [--out DIR]

Writes fleet.json (with provenance), fleet.md and fleet.png under bench/results (quick: bench/results/quick).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.common import WEIGHTS_DIR, log, md_table, parse_quick_out, write_json
from bench.provenance import code_identity, now, provenance
from bench.serving import pct
from deploy.fleet import Fleet

PROMPT_HEADER = "X-Actprompt-Prompt"
HOST_MISSES = 'actprompt_prompt_cache_misses_total{tier="host"}'


@dataclass(frozen=True)
class Plan:
    prompts: int
    tenants: int
    zipf: float
    cache_fraction: float
    clients: int
    warmup_s: float
    measure_s: float
    hot_s: float
    kill_s: float
    add_s: float


FULL = Plan(10_000, 10, 1.1, 0.4, 16, 75, 60, 40, 60, 90)
QUICK = Plan(600, 3, 1.1, 0.4, 8, 10, 10, 8, 16, 45)


# --- set-up -------------------------------------------------------------------------------------------
def import_prompts(fleet: Fleet, plan: Plan) -> tuple[list[str], list[str], int]:
    """Tenants and the backbone through the admin API; prompts straight into the database in bulk.

    Returns (tenant keys, prompt refs, artifact bytes). A few distinct random artifacts are stored under
    every prompt id (a cache entry is keyed by the row, so identical bytes still load and count apart).
    """
    from bench.synthetic import random_artifact
    from service.db.session import make_engine, make_session_factory
    from service.domain.prompts import store_prompt
    from service.engine import BackboneSpec, create_backbone

    spec = BackboneSpec("resnet20_cifar", weights=(WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri())
    admin = {"Authorization": f"Bearer {fleet.admin_key}"}
    with httpx.Client(base_url=fleet.url, headers=admin, timeout=120) as c:
        tenants = [
            c.post("/v1/tenants", json={"name": f"fleet-{i}"}).raise_for_status().json()
            for i in range(plan.tenants)
        ]
        body = {"id": "bench", "model": spec.model, "weights": spec.weights}
        c.post("/v1/backbones", json=body).raise_for_status()
    bb = create_backbone(spec, "cpu")
    layer = bb.recommended_layer
    arts = [
        random_artifact(bb, layers=[layer], num_classes=10, seed=s, prompt_shape="channel") for s in range(16)
    ]
    blobs = [a.to_bytes() for a in arts]
    engine = make_engine(fleet.database_url)
    factory = make_session_factory(engine)
    refs: list[str] = []
    owners: list[str] = []
    t0 = time.perf_counter()
    try:
        for start in range(0, plan.prompts, 1000):
            with factory() as session:
                for i in range(start, min(plan.prompts, start + 1000)):
                    tenant = tenants[i % len(tenants)]
                    art = arts[i % len(arts)]
                    row = store_prompt(
                        session,
                        tenant["id"],
                        artifact=blobs[i % len(blobs)],
                        backbone_id="bench",
                        method=art.method,
                        prompt_layers=[layer],
                        prompt_shape="channel",
                        classes=art.classes,
                        metrics=None,
                        imported=True,
                    )
                    refs.append(f"{row.prompt_id}@1")
                    owners.append(tenant["api_key"])
                session.commit()
    finally:
        engine.dispose()
    log(f"fleet: {plan.prompts} prompts stored in {time.perf_counter() - t0:.1f} s")
    return owners, refs, len(blobs[0])


# --- load ---------------------------------------------------------------------------------------------
@dataclass
class Sample:
    t0: float
    t1: float
    ok: bool
    error: str = ""


@dataclass
class Traffic:
    """Who asks for what: prompt ranks drawn from Zipf, optionally one hot prompt with a fixed share."""

    refs: list[str]
    owners: list[str]
    zipf: float
    seed: int = 0
    hot_share: float = 0.0
    seen: set[int] = field(default_factory=set)
    first_touches: int = 0

    def __post_init__(self) -> None:
        ranks = np.arange(1, len(self.refs) + 1, dtype=np.float64)
        p = ranks**-self.zipf
        self.cdf = np.cumsum(p / p.sum())
        # rank -> prompt: a fixed random order, so popularity is not the order of import
        self.order = np.random.default_rng(self.seed).permutation(len(self.refs))
        self.rng = random.Random(self.seed)

    def pick(self) -> int:
        if self.hot_share and self.rng.random() < self.hot_share:
            return int(self.order[0])
        return int(self.order[min(int(np.searchsorted(self.cdf, self.rng.random())), len(self.refs) - 1)])

    def note(self, i: int) -> None:
        if i not in self.seen:
            self.seen.add(i)
            self.first_touches += 1


async def drive(
    url: str, traffic: Traffic, image: bytes, *, clients: int, seconds: float, on_tick: Callable[[], None]
) -> list[Sample]:
    """`clients` closed-loop clients for `seconds`; `on_tick` runs every 0.5 s (in a thread)."""
    samples: list[Sample] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def client() -> None:
            while time.monotonic() < stop_at:
                i = traffic.pick()
                traffic.note(i)
                ref, key = traffic.refs[i], traffic.owners[i]
                headers = {"Authorization": f"Bearer {key}", PROMPT_HEADER: ref}
                t0 = time.monotonic()
                try:
                    r = await c.post(
                        "/v1/predict",
                        data={"prompt": ref, "top_k": "1"},
                        files=[("images", ("i.png", image, "image/png"))],
                        headers=headers,
                    )
                    ok, err = r.status_code == 200, "" if r.status_code == 200 else f"{r.status_code}"
                except httpx.HTTPError as exc:
                    ok, err = False, type(exc).__name__
                samples.append(Sample(t0, time.monotonic(), ok, err))

        async def ticker() -> None:
            while time.monotonic() < stop_at:
                await asyncio.to_thread(on_tick)
                await asyncio.sleep(0.5)

        await asyncio.gather(ticker(), *(client() for _ in range(clients)))
    return samples


def cold_loads(fleet: Fleet, replicas: list[int]) -> dict[int, float]:
    """Host-tier prompt cache misses (cold loads) so far of each reachable replica, from its /metrics."""
    out = {}
    for i in replicas:
        try:
            text = httpx.get(f"{fleet.replica_url(i)}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        out[i] = sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(HOST_MISSES)
        )
    return out


# --- phases -------------------------------------------------------------------------------------------
def restart_replicas(fleet: Fleet, replicas: list[int]) -> None:
    """Fresh processes (cold caches) in the same slots."""
    for i in replicas:
        if fleet.procs[f"api{i}"].alive():
            fleet.procs[f"api{i}"].stop()
    for i in replicas:
        fleet.start_replica(i)
    for i in replicas:
        fleet.wait_replica_ready(i, 240)
    fleet.wait_balanced(replicas, 60)


def routing_run(
    fleet: Fleet, plan: Plan, traffic: Traffic, image: bytes, balance: str | None, name: str
) -> dict[str, Any]:
    """Warm up, then measure: hit rate (compulsory misses left out), cold loads/s, latency, images/s."""
    fleet.start_haproxy(balance)
    fleet.wait_balanced([1, 2, 3], 30)
    asyncio.run(
        drive(fleet.url, traffic, image, clients=plan.clients, seconds=plan.warmup_s, on_tick=lambda: None)
    )
    before, first_before = sum(cold_loads(fleet, [1, 2, 3]).values()), traffic.first_touches
    # A predict names one prompt; it is a hit unless its replica had to load the prompt (a host-tier miss
    # is one cold load). Hits are not counted from the hit counter: one predict may look up the cache
    # more than once.
    samples = asyncio.run(
        drive(fleet.url, traffic, image, clients=plan.clients, seconds=plan.measure_s, on_tick=lambda: None)
    )
    after, first = sum(cold_loads(fleet, [1, 2, 3]).values()), traffic.first_touches - first_before
    misses = after - before
    n = len(samples)
    ok = [s.t1 - s.t0 for s in samples if s.ok]
    wall = max(s.t1 for s in samples) - min(s.t0 for s in samples)
    out = {
        "requests": n,
        "failed": n - len(ok),
        "hit_rate": round(1 - (misses - first) / max(1, n - first), 4),
        "hit_rate_raw": round(1 - misses / max(1, n), 4),
        "compulsory_misses": first,
        "cold_loads_per_s": round(misses / plan.measure_s, 2),
        "p50_ms": round(1000 * pct(ok, 50), 1),
        "p99_ms": round(1000 * pct(ok, 99), 1),
        "images_per_s": round(len(ok) / wall, 1),
    }
    log(f"fleet {name}: {out}")
    return out


def hot_run(fleet: Fleet, plan: Plan, refs: list[str], owners: list[str], image: bytes) -> dict[str, Any]:
    """One prompt takes 50 % of the predicts: each replica's share of what HAProxy sent (affine routing)."""
    traffic = Traffic(refs, owners, plan.zipf, seed=2, hot_share=0.5)
    before = fleet.served("predict")
    samples = asyncio.run(
        drive(fleet.url, traffic, image, clients=plan.clients, seconds=plan.hot_s, on_tick=lambda: None)
    )
    after = fleet.served("predict")
    counts = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}
    total = sum(counts.values())
    shares = {k: round(v / total, 4) for k, v in sorted(counts.items())}
    busiest = max(shares.values())
    out = {
        "shares": shares,
        "max_share": busiest,
        "max_over_mean": round(busiest * len(shares), 3),
        "failed": sum(not s.ok for s in samples),
    }
    log(f"fleet hot prompt: {out}")
    return out


def windows(samples: list[Sample], t0: float, t1: float, width: float) -> list[tuple[float, int, int]]:
    """(window start relative to t0, answered, failed) per window of `width` seconds."""
    out = []
    t = t0
    while t < t1:
        inside = [s for s in samples if t <= s.t1 < t + width]
        out.append((round(t - t0, 2), sum(s.ok for s in inside), sum(not s.ok for s in inside)))
        t += width
    return out


def kill_run(
    fleet: Fleet, plan: Plan, traffic: Traffic, image: bytes, victim: int, survivors: list[int]
) -> dict[str, Any]:
    """SIGKILL replica `victim` a third into the run: failed predicts; recovery of traffic and hit rate."""
    ticks: list[tuple[float, dict[int, float]]] = []  # (time, cold loads of each live replica)
    killed: list[float] = []
    t_start = time.monotonic()

    def tick() -> None:
        now_ = time.monotonic()
        if not killed and now_ - t_start >= plan.kill_s / 3:
            killed.append(time.monotonic())
            fleet.kill(f"api{victim}", signal.SIGKILL)
        ticks.append((time.monotonic(), cold_loads(fleet, [*survivors, victim])))

    samples = asyncio.run(
        drive(fleet.url, traffic, image, clients=plan.clients, seconds=plan.kill_s, on_tick=tick)
    )
    t_kill = killed[0]
    width = 1.0
    before = [w for w in windows(samples, t_start, t_kill, width)[1:] if w[0] + width <= t_kill - t_start]
    base_rate = float(np.mean([w[1] for w in before])) if before else 0.0
    after = windows(samples, t_kill, max(s.t1 for s in samples), width)
    # traffic: after the last failure, the first 3-s stretch answering >= 80 % of the pre-kill rate
    traffic_s = _recovered_at(after, base_rate)
    # hit rate: 1 - cold loads per predict over ~1 s, against the rate before the kill minus 5 points
    rates = []
    for (ta, a), (tb, b) in zip(ticks, ticks[2:], strict=False):
        loads = sum(b[i] - a[i] for i in b if i in a)
        n = sum(ta <= s.t1 < tb for s in samples)
        rates.append((tb - t_kill, 1 - loads / n if n else 1.0))
    pre = [r for t, r in rates if t < 0]
    base_hit = float(np.mean(pre[-6:])) if pre else 1.0
    post = [(t, r) for t, r in rates if t >= 0]
    hit_s = next((t for j, (t, _) in enumerate(post) if all(r >= base_hit - 0.05 for _, r in post[j:])), None)
    failed = [s for s in samples if not s.ok]
    out = {
        "failed": len(failed),
        "failed_after_1s": sum(s.t1 > t_kill + 1 for s in failed),
        "errors": sorted({s.error for s in failed}),
        "requests": len(samples),
        "traffic_recover_s": traffic_s,
        "hit_rate_recover_s": None if hit_s is None else round(hit_s, 2),
        "recover_s": None if traffic_s is None or hit_s is None else round(max(traffic_s, hit_s), 2),
        "pre_kill_answers_per_s": round(base_rate, 1),
        "pre_kill_hit_rate": round(base_hit, 4),
        "per_second": after,
    }
    log(f"fleet kill: { {k: v for k, v in out.items() if k != 'per_second'} }")
    return out


def _recovered_at(ws: list[tuple[float, int, int]], base_rate: float) -> float | None:
    """Seconds after the kill when traffic is back: no failure from there on, 3 s at >= 80 % of before."""
    full = ws[:-1]  # the last window is cut by the end of the run
    last_failure = max((j for j, w in enumerate(full) if w[2]), default=-1)
    for j in range(last_failure + 1, len(full) - 2):
        if np.mean([w[1] for w in full[j : j + 3]]) >= 0.8 * base_rate:
            return full[j][0]
    return None


def add_run(
    fleet: Fleet, plan: Plan, traffic: Traffic, image: bytes, live: list[int], new: int
) -> dict[str, Any]:
    """Start replica `new` while traffic runs: seconds until it gets >= 80 % of its even share."""
    served: list[tuple[float, dict[str, int]]] = []
    started: list[float] = []
    ready: list[float] = []
    t_start = time.monotonic()

    def tick() -> None:
        if not started and time.monotonic() - t_start >= 2:
            started.append(time.monotonic())
            fleet.start_replica(new)
        if started and not ready:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{fleet.replica_url(new)}/readyz", timeout=0.5).status_code == 200:
                    ready.append(time.monotonic())
        served.append((time.monotonic(), fleet.served("predict")))

    asyncio.run(drive(fleet.url, traffic, image, clients=plan.clients, seconds=plan.add_s, on_tick=tick))
    fair = 1 / (len(live) + 1)
    name = f"api{new}"
    share_at: list[tuple[float, float]] = []
    for (_, a), (tb, b) in zip(served, served[4:], strict=False):  # 2-s windows
        total = sum(b.values()) - sum(a.values())
        mine = b.get(name, 0) - a.get(name, 0)
        share_at.append((round(tb - started[0], 2), mine / total if total else 0.0))
    took = next((t for t, s in share_at if t > 0 and s >= 0.8 * fair), None)
    out = {
        "add_s": took,
        "fair_share": round(fair, 3),
        "final_share": round(share_at[-1][1], 3) if share_at else None,
        "ready_s": round(ready[0] - started[0], 2) if ready else None,
        "share_per_tick": share_at[-20:],
    }
    log(f"fleet add: { {k: v for k, v in out.items() if k != 'share_per_tick'} }")
    return out


# --- report -------------------------------------------------------------------------------------------
def goal_lines(r: dict[str, Any]) -> list[str]:
    """Each goal of the fleet against this run's numbers: met, or by how much it is missed."""
    aff, rr = "affine", "round_robin"
    hot, kill = r["hot"], r["kill_detail"]
    goals = [
        (f"affine hit rate {r['hit_rate'][aff]:.3f} >= 0.95", r["hit_rate"][aff] >= 0.95),
        (
            f"p99 {r['p99_ms'][aff]} ms (affine) < {r['p99_ms'][rr]} ms (round robin)",
            r["p99_ms"][aff] < r["p99_ms"][rr],
        ),
        (
            f"images/s {r['images_per_s'][aff]} (affine) > {r['images_per_s'][rr]} (round robin)",
            r["images_per_s"][aff] > r["images_per_s"][rr],
        ),
        (
            f"hot prompt: busiest replica {hot['max_over_mean']:.2f} x the mean <= 1.25",
            hot["max_over_mean"] <= 1.25,
        ),
        (
            f"replica killed: {kill['failed_after_1s']} failed predicts after the in-flight ones (1 s) = 0",
            kill["failed_after_1s"] == 0,
        ),
        (
            f"replica killed: traffic rebalanced after {kill['traffic_recover_s']} s <= 5 s",
            kill["traffic_recover_s"] is not None and kill["traffic_recover_s"] <= 5,
        ),
        (
            f"replica added: its share after {r['add_s']} s <= 30 s",
            r["add_s"] is not None and r["add_s"] <= 30,
        ),
    ]
    return [f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in goals]


def write_report(results: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    r = results
    rows = [
        [
            name,
            f"{r['hit_rate'][name]:.3f}",
            f"{r['runs'][name]['hit_rate_raw']:.3f}",
            r["runs"][name]["cold_loads_per_s"],
            r["p50_ms"][name],
            r["p99_ms"][name],
            r["images_per_s"][name],
        ]
        for name in ("round_robin", "affine")
    ]
    kill, hot = r["kill_detail"], r["hot"]
    text = "\n".join(
        [
            "# Fleet: prompt-affine routing against round robin",
            "",
            f"{r['config']['replicas']} replicas behind HAProxy, {r['config']['prompts']} prompts, "
            f"Zipf({r['config']['zipf']}), host cache {r['config']['cache_fraction']:.0%} of the prompts "
            f"per replica, {r['config']['clients']} closed-loop clients, 1 image per predict.",
            "",
            md_table(
                ["routing", "hit rate", "raw hit rate", "cold loads/s", "p50 ms", "p99 ms", "images/s"], rows
            ),
            "",
            "Hit rate = 1 - cold loads per predict, compulsory misses (a prompt's first request in the run) "
            "left out; raw hit rate counts them.",
            "",
            f"- hot prompt (50 % of the traffic): busiest replica {hot['max_share']:.1%} of the predicts "
            f"({hot['max_over_mean']:.2f} x the mean); shares {hot['shares']}",
            f"- replica killed: {kill['failed']} failed predicts "
            f"({kill['failed_after_1s']} later than 1 s after the kill), traffic recovered after "
            f"{kill['traffic_recover_s']} s, hit rate after {kill['hit_rate_recover_s']} s",
            f"- replica added: {r['add_s']} s from its start until it carried 80 % of its even share "
            f"(ready after {r['add_detail']['ready_s']} s)",
            "",
            "## Goals",
            "",
            *goal_lines(r),
            "",
        ]
    )
    (out / "fleet.md").write_text(text)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = ["round_robin", "affine"]
    axes[0].bar(names, [r["hit_rate"][n] for n in names], color=["#999", "#2a7"])
    axes[0].set_ylim(0, 1)
    axes[0].set_title("fleet host-cache hit rate")
    x = np.arange(2)
    axes[1].bar(x - 0.2, [r["p50_ms"][n] for n in names], 0.4, label="p50")
    axes[1].bar(x + 0.2, [r["p99_ms"][n] for n in names], 0.4, label="p99")
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("ms")
    axes[1].legend()
    axes[1].set_title("predict latency")
    ps = kill["per_second"]
    axes[2].plot([w[0] for w in ps], [w[1] for w in ps], label="answered/s")
    axes[2].plot([w[0] for w in ps], [w[2] for w in ps], label="failed/s")
    axes[2].axvline(0, color="r", lw=0.8)
    axes[2].set_xlabel("s after the kill")
    axes[2].legend()
    axes[2].set_title("one replica killed")
    fig.tight_layout()
    fig.savefig(out / "fleet.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_quick_out(argv, __doc__, "600 prompts, seconds-long phases (a smoke run)")
    plan = QUICK if args.quick else FULL
    out: Path = args.out
    started, identity = now(), code_identity()
    load = [round(x, 2) for x in os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="actprompt-fleet-bench-"))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    image = buf.getvalue()
    fleet = Fleet(root, replicas=3, workers=0)
    # The cache size depends on the artifact size, known after import: start, import, then restart.
    fleet.extra_env = {"ACTPROMPT_RATE_LIMIT_PER_SECOND": "0", "ACTPROMPT_LOG_LEVEL": "WARNING"}
    try:
        fleet.start()
        owners, refs, size = import_prompts(fleet, plan)
        cache_bytes = int(plan.cache_fraction * plan.prompts * size)
        fleet.extra_env["ACTPROMPT_PROMPT_CACHE_HOST_BYTES"] = str(cache_bytes)
        log(f"fleet: artifact {size} B, host cache {cache_bytes} B per replica ({plan.cache_fraction:.0%})")
        runs = {}
        for name, balance in (("round_robin", "roundrobin"), ("affine", None)):
            restart_replicas(fleet, [1, 2, 3])
            runs[name] = routing_run(
                fleet, plan, Traffic(refs, owners, plan.zipf, seed=1), image, balance, name
            )
        hot = hot_run(fleet, plan, refs, owners, image)
        kill = kill_run(fleet, plan, Traffic(refs, owners, plan.zipf, seed=3), image, 3, [1, 2])
        add = add_run(fleet, plan, Traffic(refs, owners, plan.zipf, seed=4), image, [1, 2], 4)
    finally:
        fleet.stop()
        shutil.rmtree(root, ignore_errors=True)
    names = ("affine", "round_robin")
    results = {
        "hit_rate": {n: runs[n]["hit_rate"] for n in names},
        "hot_prompt_max_share": hot["max_share"],
        "kill": {
            k: kill[k]
            for k in ("failed", "recover_s", "failed_after_1s", "traffic_recover_s", "hit_rate_recover_s")
        },
        "add_s": add["add_s"],
        "p50_ms": {n: runs[n]["p50_ms"] for n in names},
        "p99_ms": {n: runs[n]["p99_ms"] for n in names},
        "images_per_s": {n: runs[n]["images_per_s"] for n in names},
        "runs": runs,
        "hot": hot,
        "kill_detail": kill,
        "add_detail": add,
        "config": {
            "replicas": 3,
            "prompts": plan.prompts,
            "zipf": plan.zipf,
            "cache_fraction": plan.cache_fraction,
            "host_cache_bytes": cache_bytes,
            "artifact_bytes": size,
            "clients": plan.clients,
            "phases_s": {
                "warmup": plan.warmup_s,
                "measure": plan.measure_s,
                "hot": plan.hot_s,
                "kill": plan.kill_s,
                "add": plan.add_s,
            },
            "quick": args.quick,
        },
    }
    results["provenance"] = provenance(started, identity=identity, extra={"load_average_at_start": load})
    write_json(out / "fleet.json", results)
    write_report(results, out)
    log(f"fleet: wrote {out / 'fleet.json'}, fleet.md, fleet.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
