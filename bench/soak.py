"""Soak: `actprompt serve` at 70 % of its saturation for a long time, many prompts through a small cache.

    python -m bench.soak [--minutes 30] [--prompts 10000] [--quick]      (make soak)

10,000 prompts over 20 tenants are imported through the API; the host prompt cache
(ACTPROMPT_PROMPT_CACHE_HOST_BYTES) holds a quarter of their bytes, so prompts keep cycling in and out
while one-image requests, Zipf(1.1) over the prompts, arrive open loop at 70 % of the one-image saturation
(measured first with wrk on the same mix). Every minute the resident memory of the whole process tree is
sampled; growth is measured from the end of the warm-up (the first fifth of the run, at least 1 min) to the
end. Writes the ``soak`` key of serving.json (other keys survive) and the time series beside it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from bench.common import log, read_json, results_dir, set_threads, write_json
from bench.openloop import cpu_share, run_open_loop, summarize
from bench.provenance import code_identity, now, provenance
from bench.serving_http import _metric_sum
from bench.serving_peers import DEFAULT, QUICK, TreeCPU, make_corpus, start_actprompt
from bench.wrk import run_wrk


def cache_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        f"{kind}_{tier}": _metric_sum(text, f'actprompt_prompt_cache_{kind}_total{{tier="{tier}"}}')
        for kind in ("hits", "misses")
        for tier in ("host", "device")
    }


def run(minutes: float, n_prompts: int, out: Path, results: Path, *, quick: bool) -> dict[str, Any]:
    started, identity = now(), code_identity()
    plan = replace(QUICK if quick else DEFAULT, prompts=n_prompts, many_requests=max(4 * n_prompts, 2000))
    corpus = make_corpus(plan)
    cache_bytes = max(1, sum(len(a) for a in corpus.artifacts) // 4)
    env = {"ACTPROMPT_PROMPT_CACHE_HOST_BYTES": str(cache_bytes)}
    target = start_actprompt(corpus, plan, out / "logs", env)
    series: list[dict[str, Any]] = []
    totals: dict[str, int] = {}
    try:
        url = target.server.url
        wrk_reqs = target.wrk_requests(corpus.zipf, corpus.b64, 1)
        sat = run_wrk(url, "/v1/predict", wrk_reqs, connections=16, seconds=3 if quick else 15)
        rate = 0.7 * sat["rps"]
        log(
            f"soak: saturation {sat['rps']} req/s on the Zipf mix; "
            f"soaking at {rate:.1f} req/s for {minutes} min"
        )
        raw = target.raw_requests(corpus.zipf, corpus.b64, 1)
        cpu = TreeCPU(target.server.proc.pid)
        before = cache_counts(url)
        chunk = min(60.0, minutes * 60)
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < minutes * 60 - 1:  # per chunk only its summary is kept
            with cpu_share() as share:
                records, lateness, secs = run_open_loop(
                    url, raw[i % len(raw) :] + raw[: i % len(raw)], rate=rate, seconds=chunk, seed=i
                )
            i += len(records)
            s = summarize(records, lateness, secs)
            for k in ("ok", "refused", "errors", "timeouts", "conn_errors"):
                totals[k] = totals.get(k, 0) + int(s[k])
            point = {
                "t_min": round((time.perf_counter() - t0) / 60, 2),
                "rss_bytes": cpu.rss(),
                "ok_p99_ms": s["ok_p99_ms"],
                "errors": s["errors"] + s["timeouts"] + s["conn_errors"],
                # what kind: a non-2xx other than 503 (its statuses), a timeout, or a lost connection
                "error_kinds": {
                    "statuses": s["error_statuses"],
                    "timeouts": s["timeouts"],
                    "conn_errors": s["conn_errors"],
                },
                "refused": s["refused"],
                "generator_lateness_p99_ms": s["generator_lateness_p99_ms"],
                "generator_cpu_cores": share["cores"],
            }
            series.append(point)
            log(
                f"soak {point['t_min']:.1f} min: rss {point['rss_bytes'] / 2**20:.0f} MiB, {s['ok']} ok, "
                f"p99 {s['ok_p99_ms']} ms, errors {point['errors']}, refused {s['refused']}"
            )
        after = cache_counts(url)
    finally:
        kept = target.server.stop(keep_log_in=out / "logs")
        if kept:
            log(f"soak: the server had exited; its log is kept in {kept}")
    warm = max(1, round(len(series) / 5)) if len(series) > 1 else 0
    base = series[warm - 1]["rss_bytes"] if warm else series[0]["rss_bytes"]
    hits = after["hits_host"] - before["hits_host"]
    misses = after["misses_host"] - before["misses_host"]
    summary = {
        "minutes": round((series[-1]["t_min"] if series else 0.0), 2),
        "rss_growth": round(series[-1]["rss_bytes"] / base - 1, 4) if series else None,
        "errors": totals.get("errors", 0) + totals.get("timeouts", 0) + totals.get("conn_errors", 0),
        # one predict may look the cache up more than once, so the hit counter overstates: a miss is a cold
        # load, and the rate is per answered predict (as bench/fleet.py counts it)
        "hit_rate": round(1 - misses / totals["ok"], 4) if totals.get("ok") else None,
        "hit_rate_counter": round(hits / (hits + misses), 4) if hits + misses else None,
        "refused": totals.get("refused", 0),
        "ok": totals.get("ok", 0),
        "rate_rps": round(rate, 2),
        "saturation_rps": sat["rps"],
        "prompts": n_prompts,
        "host_cache_bytes": cache_bytes,
        "warmup_minutes": series[warm - 1]["t_min"] if warm else 0.0,
        "cache": {k: after[k] - before[k] for k in after},
    }
    write_json(out / "soak.json", {"summary": summary, "series": series})
    doc = read_json(results) if results.exists() else {}
    doc = doc if isinstance(doc, dict) else {}
    doc["soak"] = {
        **summary,
        "provenance": provenance(
            started, identity=identity, extra={"quick": quick, "details": str(out / "soak.json")}
        ),
    }
    write_json(results, doc)
    log(f"soak: {summary}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="half a minute, 200 prompts: proves the path")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    set_threads()
    results = args.results or results_dir(args.quick) / "serving.json"
    summary = run(
        args.minutes or (0.5 if args.quick else 30.0),
        args.prompts or (200 if args.quick else 10_000),
        results.parent / "soak",
        results,
        quick=args.quick,
    )
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
