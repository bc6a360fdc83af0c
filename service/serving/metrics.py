"""Prometheus metrics of the serving path, registered once per process in the default registry.

The gateway's ``GET /metrics`` exposes the default registry, so these appear there without wiring. Module
level, because a metric registered twice is an error and tests build many predictors in one process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BACKBONES",
    "BATCH_PROMPTS",
    "BATCH_ROWS",
    "CACHE_BYTES",
    "CACHE_EVICTIONS",
    "CACHE_HITS",
    "CACHE_LOAD_SECONDS",
    "CACHE_MISSES",
    "ENGINE_REPLY_TIMEOUTS",
    "ENGINE_UP",
    "MODEL_SECONDS",
    "MODEL_THREADS",
    "QUEUE_ROWS",
    "QUEUE_WAIT_SECONDS",
    "RATE_LIMITED",
    "RATE_LIMIT_FALLBACK",
    "RATE_LIMIT_REDIS_OUTAGES",
    "RATE_LIMIT_REDIS_UP",
    "REFUSED",
    "REQUESTS",
    "SHED",
    "set_per_tenant_labels",
    "tenant_label",
]

# Batches are at most a few hundred rows; powers of two show how full they run.
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Milliseconds matter: the batcher waits a few of them, a CPU forward pass takes tens to hundreds.
_SECOND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

BATCH_ROWS = Histogram(
    "actprompt_serving_batch_rows",
    "Rows (image x prompt) per forward pass.",
    ["backbone"],
    buckets=_ROW_BUCKETS,
)
BATCH_PROMPTS = Histogram(
    "actprompt_serving_batch_prompts",
    "Distinct prompts per forward pass.",
    ["backbone"],
    buckets=_ROW_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "actprompt_serving_queue_wait_seconds",
    "Time a predict request waited in the batcher before its forward pass started.",
    ["backbone"],
    buckets=_SECOND_BUCKETS,
)
MODEL_SECONDS = Histogram(
    "actprompt_serving_model_seconds",
    "Model-thread time of one batch's forward pass (slot writes not included).",
    ["backbone"],
    buckets=_SECOND_BUCKETS,
)
QUEUE_ROWS = Gauge(
    "actprompt_serving_queue_rows",
    "Rows (image x prompt) admitted and not yet computed: the engine's queue depth in its own unit.",
    ["backbone"],
    multiprocess_mode="livesum",
)
REFUSED = Counter(
    "actprompt_serving_refused_total",
    "Predict requests refused by admission control (tenant: see tenant_label), by reason "
    "(overloaded: past the queue-wait budget; deadline: the request's deadline could not be met).",
    ["tenant", "reason"],
)
BACKBONES = Gauge(
    "actprompt_serving_backbones",
    "Backbones this process holds in memory (1 per model and device); the pid label names the process.",
    ["backbone", "device"],
    multiprocess_mode="liveall",
)
MODEL_THREADS = Gauge(
    "actprompt_serving_model_threads",
    "Threads that run a backbone's passes (lanes x torch's intra-op threads in each), in the process that "
    "holds it (the pid label).",
    ["backbone"],
    multiprocess_mode="liveall",
)
ENGINE_UP = Gauge(
    "actprompt_serving_engine_up",
    "1 while this front process hears the engine process, 0 while it fails requests fast (one series per "
    "front: the pid label).",
    ["endpoint"],
    multiprocess_mode="liveall",
)
ENGINE_REPLY_TIMEOUTS = Counter(
    "actprompt_serving_engine_reply_timeouts_total",
    "Requests a front gave up on because the engine, still answering heartbeats, did not reply within "
    "the ceiling (a fault: a pass that does not return).",
    ["op"],
)
CACHE_HITS = Counter("actprompt_prompt_cache_hits_total", "Prompt cache hits.", ["tier"])
CACHE_MISSES = Counter("actprompt_prompt_cache_misses_total", "Prompt cache misses.", ["tier"])
CACHE_EVICTIONS = Counter("actprompt_prompt_cache_evictions_total", "Prompt cache evictions.", ["tier"])
CACHE_BYTES = Gauge("actprompt_prompt_cache_bytes", "Bytes of prompts resident in the cache tier.", ["tier"])
CACHE_LOAD_SECONDS = Histogram(
    "actprompt_prompt_cache_load_seconds",
    "Cold load of one prompt: source read plus decode.",
    buckets=_SECOND_BUCKETS,
)
REQUESTS = Counter(
    "actprompt_predict_requests_total",
    "Predict requests by tenant (see tenant_label) and outcome.",
    ["tenant", "outcome"],
)
SHED = Counter(
    "actprompt_serving_shed_total",
    "Predicts a front refused before reading their body (front_full: its in-flight limit; "
    "tenant_overloaded: the engine had just refused the tenant).",
    ["reason"],
)
RATE_LIMITED = Counter(
    "actprompt_rate_limited_total",
    "Requests refused by the rate limit (tenant: see tenant_label).",
    ["tenant"],
)
RATE_LIMIT_FALLBACK = Counter(
    "actprompt_rate_limit_fallback_total",
    "Rate-limit decisions made by the per-process fallback because Redis was unavailable.",
)
RATE_LIMIT_REDIS_OUTAGES = Counter(
    "actprompt_rate_limit_redis_outages_total", "Times the rate limiter's circuit breaker opened."
)
RATE_LIMIT_REDIS_UP = Gauge(
    "actprompt_rate_limit_redis_up", "1 while the shared (Redis) rate limiter answers, 0 during an outage."
)

#: Per-tenant labels are off by default: a label per tenant grows the scrape without bound.
_TENANT_LABELS = {"on": False}


def set_per_tenant_labels(enabled: bool) -> None:
    """Whether the tenant label carries the tenant id (small deployments) or ``-`` (the default)."""
    _TENANT_LABELS["on"] = enabled


def tenant_label(tenant_id: str) -> str:
    return (tenant_id or "-") if _TENANT_LABELS["on"] else "-"
