"""An open-loop HTTP load generator: each request leaves at its scheduled time, answered or not.

A closed-loop tool (wrk) waits for an answer before it sends again, so an overloaded server slows the
load down and hides its queue. Here arrivals are a seeded Poisson process at a fixed rate; latency is
measured from the *scheduled* time (so waiting for a free connection counts against the server, no
coordinated omission), and the generator's own lateness (how late it woke for each send) is reported
so a run on a busy box can be judged.

Requests are prepared bytes written on plain asyncio connections (one per request in flight, reused
when the server keeps them alive); responses are parsed with httptools (the parser uvicorn uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools


@dataclass(frozen=True)
class Record:
    """One request: when it was due, when it left, when it ended, and how."""

    scheduled: float
    sent: float
    done: float
    outcome: str  # "ok" | "refused" (503) | "error" (another status) | "timeout" | "conn_error"
    status: int = 0
    retry_after: bool = False


def build_request(host: str, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 POST with a JSON body, ready to write."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """A keep-alive connection that carries one request at a time."""

    def __init__(self) -> None:
        self.transport: Any = None  # an asyncio or a uvloop transport (not an asyncio.Transport subclass)
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None
        self.retry_after = False
        self.alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"bad response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._fail(ConnectionError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        self.alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = True

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.retry_after))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bool]]:
        assert self.transport is not None
        self.retry_after = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()


@dataclass
class _Pool:
    """Keep-alive connections, the last one freed reused first; one idle longer than ``idle_expiry_s`` is
    closed instead (as httpx and HAProxy do): a server closes idle connections after its keep-alive timeout
    (uvicorn: 5 s), and a request written just as that close arrives is lost to a race that only a client
    which expires its idle connections first avoids."""

    host: str
    port: int
    max_connections: int
    idle_expiry_s: float = 2.0
    idle: list[tuple[_Connection, float]] = field(default_factory=list)  # (connection, when it was freed)
    open: int = 0
    slots: asyncio.Semaphore | None = None

    async def get(self) -> _Connection:
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.max_connections)
        await self.slots.acquire()
        now = time.monotonic()
        while self.idle:
            conn, freed = self.idle.pop()
            if conn.alive and now - freed <= self.idle_expiry_s:
                return conn
            conn.close()
            self.open -= 1
        try:
            _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        except BaseException:
            self.slots.release()
            raise
        self.open += 1
        return conn

    def put(self, conn: _Connection) -> None:
        if conn.alive:
            self.idle.append((conn, time.monotonic()))
        else:
            self.open -= 1
        assert self.slots is not None
        self.slots.release()


async def _run(
    url: str,
    requests: Sequence[bytes],
    *,
    rate: float,
    seconds: float,
    timeout: float,
    max_connections: int,
    seed: int,
    idle_expiry_s: float,
) -> tuple[list[Record], list[float], float]:
    parts = urlsplit(url)
    pool = _Pool(parts.hostname or "127.0.0.1", parts.port or 80, max_connections, idle_expiry_s)
    records: list[Record] = []
    lateness: list[float] = []
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()

    async def one(data: bytes, scheduled: float) -> None:
        sent = scheduled
        try:
            async with asyncio.timeout(timeout):
                conn = await pool.get()
                sent = loop.time()
                try:
                    status, retry_after = await conn.send(data)
                except BaseException:
                    conn.close()
                    raise
                finally:
                    pool.put(conn)
        except TimeoutError:
            records.append(Record(scheduled, sent, loop.time(), "timeout"))
            return
        except (ConnectionError, OSError):
            records.append(Record(scheduled, sent, loop.time(), "conn_error"))
            return
        except Exception:  # every request ends as exactly one record, whatever went wrong
            records.append(Record(scheduled, sent, loop.time(), "error"))
            return
        kind = "ok" if status == 200 else "refused" if status == 503 else "error"
        records.append(Record(scheduled, sent, loop.time(), kind, status, retry_after))

    tasks: set[asyncio.Task[None]] = set()
    start = loop.time() + 0.05
    due = start
    i = 0
    while due < start + seconds:
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lateness.append(max(0.0, loop.time() - due))
        task = asyncio.create_task(one(requests[i % len(requests)], due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        due += rng.expovariate(rate)
    if tasks:
        await asyncio.wait(tasks)
    for conn, _ in pool.idle:
        conn.close()
    return records, lateness, seconds


def run_open_loop(
    url: str,
    requests: Sequence[bytes],
    *,
    rate: float,
    seconds: float,
    timeout: float = 10.0,
    max_connections: int = 4096,
    seed: int = 0,
    idle_expiry_s: float = 2.0,
) -> tuple[list[Record], list[float], float]:
    """Poisson arrivals at `rate`/s for `seconds`, cycling `requests`; (records, lateness s, seconds).

    Every request ends as a record: answered, timed out after `timeout` s from its schedule, or a
    connection error. The generator's CPU time is reported by `summarize` callers via `process_time`.
    """
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        runner = asyncio.run
    return runner(
        _run(
            url,
            requests,
            rate=rate,
            seconds=seconds,
            timeout=timeout,
            max_connections=max_connections,
            seed=seed,
            idle_expiry_s=idle_expiry_s,
        )
    )


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def summarize(
    records: Sequence[Record],
    lateness: Sequence[float],
    seconds: float,
    *,
    saturation_rps: float | None = None,
) -> dict[str, Any]:
    """Counts, rates and latency percentiles of one open-loop run (latency from the scheduled time)."""
    by: dict[str, list[Record]] = {}
    for r in records:
        by.setdefault(r.outcome, []).append(r)
    ok = [r.done - r.scheduled for r in by.get("ok", [])]
    refused = [r.done - r.scheduled for r in by.get("refused", [])]
    goodput = len(ok) / seconds if seconds else 0.0
    return {
        "offered_rps": round(len(records) / seconds, 2) if seconds else None,
        "requests": len(records),
        "ok": len(ok),
        "refused": len(refused),
        "refused_without_retry_after": sum(1 for r in by.get("refused", []) if not r.retry_after),
        "errors": len(by.get("error", [])),
        "timeouts": len(by.get("timeout", [])),
        "conn_errors": len(by.get("conn_error", [])),
        "goodput_rps": round(goodput, 2),
        "goodput_ratio": round(goodput / saturation_rps, 3) if saturation_rps else None,
        "ok_p50_ms": _ms(_pct(ok, 50)),
        "ok_p99_ms": _ms(_pct(ok, 99)),
        "refusal_p99_ms": _ms(_pct(refused, 99)),
        "generator_lateness_p50_ms": _ms(_pct(lateness, 50)),
        "generator_lateness_p99_ms": _ms(_pct(lateness, 99)),
        "generator_lateness_max_ms": _ms(max(lateness) if lateness else None),
        "error_statuses": sorted({r.status for r in by.get("error", [])}),
    }


@contextlib.contextmanager
def generator_priority(nice: int = -10) -> Any:
    """Run the calling thread (the generator's loop) at ``nice`` meanwhile, if allowed (a negative value
    needs root, as in CI): yields the nice value it runs at.

    The generator stands for clients on other machines. Sharing two cores with the server it overloads, it
    woke up to 200 ms late at 3x, and every late send counts as server latency. With priority it sends on
    time; its own CPU still comes out of the same cores (``cpu_share`` reports it).
    """
    before = os.getpriority(os.PRIO_PROCESS, 0)  # Linux: 0 is the calling thread (nice is per thread)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        yield before
        return
    try:
        yield nice
    finally:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, before)


@contextlib.contextmanager
def cpu_share() -> Any:
    """Cores this process used meanwhile (the generator's own load on the box): yields a dict."""
    out: dict[str, float] = {}
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        yield out
    finally:
        out["cores"] = round((time.process_time() - c0) / max(1e-9, time.perf_counter() - t0), 3)
