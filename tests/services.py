"""The real services the suite needs, checked in one place: a missing one fails with one clear line.

Tests marked `postgres` or `redis` get a ping first (once per session); without the service the test fails
with the service's address and how to start it, instead of a confusing assertion deep inside (a rate
limiter that fails open turns a missing Redis into `assert 200 == 429`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
#: moto's standalone S3 server: `.ci/run` starts it (`python -m tests.services s3`), as does the `s3_url`
#: fixture when it is not running.
S3_HOST, S3_PORT = "127.0.0.1", 5000
S3_URL = f"http://{S3_HOST}:{S3_PORT}"
#: moto accepts any credentials; boto3 only needs some to sign with (taken from the environment).
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
HOW = "`bash .ci/run` starts PostgreSQL and Redis, then runs `make test` (`make test-quick` needs neither)"
#: Fixtures that reach a service: a test using one is marked for it (so `make test-quick` leaves it out).
SERVICE_FIXTURES = {
    "pg_database": "postgres",
    "pg_url": "postgres",
    "redis_client": "redis",
    "s3_url": "s3",
    "private_s3": "s3",
}

_checked: dict[str, str | None] = {}


def _ping_postgres() -> str | None:
    import psycopg

    try:
        with psycopg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres", connect_timeout=3
        ) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} is not answering ({type(exc).__name__}: {exc})".strip()
    return None


def _ping_redis() -> str | None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} is not answering ({type(exc).__name__}: {exc})"
    finally:
        client.close()
    return None


_PINGS = {"postgres": _ping_postgres, "redis": _ping_redis}


def require(service: str) -> None:
    """Fail the calling test with one line when `service` ("postgres" | "redis") is down."""
    if os.environ.get("ACTPROMPT_TEST_SKIP_SERVICE_CHECK"):
        return
    if service not in _checked:
        _checked[service] = _PINGS[service]()
    problem = _checked[service]
    if problem is not None:
        pytest.fail(f"{problem}; {HOW}", pytrace=False)


def ping_s3(url: str = S3_URL) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200  # moto's ListBuckets
    except httpx.HTTPError:
        return False


def start_moto(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """moto's standalone S3 server on 127.0.0.1:`port`, in its own process group, once it answers."""
    moto = Path(sys.executable).with_name("moto_server")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(moto), "-H", S3_HOST, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while not ping_s3(f"http://{S3_HOST}:{port}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"moto_server on port {port} did not start; see {log_path}")
        time.sleep(0.2)
    return proc


def ensure_s3() -> subprocess.Popen[bytes] | None:
    """Start the shared moto server unless one answers; the process when this call started it."""
    if ping_s3():
        return None
    return start_moto(S3_PORT, Path(os.environ.get("TMPDIR", "/tmp")) / "actprompt-moto.log")


def forget_queues(client: object, *names: str) -> int:
    """Delete what Redis holds for these queue names only (their lists and bindings): a "flush" scoped
    to one test, so tests running at the same time on the same Redis DB keep their messages."""
    deleted = 0
    for key in list(client.scan_iter("*")):  # type: ignore[attr-defined]
        text = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        if text.startswith("_kombu.binding."):
            for member in list(client.smembers(key)):  # type: ignore[attr-defined]
                if any(name.encode() in member for name in names):
                    deleted += int(client.srem(key, member))  # type: ignore[attr-defined]
        elif any(name in text for name in names):
            deleted += int(client.delete(key))  # type: ignore[attr-defined]
    return deleted


if __name__ == "__main__":  # `.ci/run`: `python -m tests.services s3` starts the S3 server, idempotently
    if sys.argv[1:] != ["s3"]:
        raise SystemExit("usage: python -m tests.services s3")
    started = ensure_s3()
    print(f"S3 (moto) at {S3_URL}" + (f", started (pid {started.pid})" if started else ", already running"))
