"""Prometheus series of the object storage: cache hits, bytes moved, and the store's failures."""

from __future__ import annotations

from prometheus_client import Counter

CACHE_REQUESTS = Counter(
    "actprompt_object_cache_requests_total",
    "Reads of a stored object through this node's on-disk cache, by result (hit, miss).",
    ["result"],
)
CACHE_EVICTED_BYTES = Counter(
    "actprompt_object_cache_evicted_bytes_total", "Bytes evicted from this node's on-disk object cache."
)
STORAGE_BYTES = Counter(
    "actprompt_storage_bytes_total", "Bytes sent to or read from the object store.", ["direction"]
)
STORAGE_FAILURES = Counter(
    "actprompt_storage_failures_total",
    "Object store calls that failed, by kind (unavailable: timeouts, refused, 5xx; missing: no such object).",
    ["kind"],
)
