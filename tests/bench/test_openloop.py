"""The open-loop generator counts every request once, under the right outcome, on a real socket server."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest

from bench.openloop import build_request, generator_priority, run_open_loop, summarize

ACCEPTED: list[object] = []  # one entry per connection the test server accepted


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Counts the connection in ACCEPTED, then answers by the body's first byte: o = 200, d = 200 after
    0.1 s, r = 503 + Retry-After, e = 500, s = never, c = close."""
    ACCEPTED.append(writer)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            kind = (await reader.readexactly(length))[:1]
            if kind == b"s":
                await asyncio.sleep(3600)
            if kind == b"d":
                await asyncio.sleep(0.1)
                kind = b"o"
            if kind == b"c":
                writer.close()
                return
            status = {b"o": b"200 OK", b"r": b"503 Service Unavailable", b"e": b"500 Internal Server Error"}[
                kind
            ]
            extra = b"Retry-After: 1\r\n" if kind == b"r" else b""
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n" + extra + b"\r\n{}")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture
def server() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, asyncio.base_events.Server] = {}

    async def start() -> None:
        box["server"] = await asyncio.start_server(_handle, "127.0.0.1", 0)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()))
    thread.start()
    ready.wait(10)
    yield box["server"].sockets[0].getsockname()[1]

    async def stop() -> None:
        box["server"].close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop.stop()

    asyncio.run_coroutine_threadsafe(stop(), loop)
    thread.join(10)
    loop.close()


def test_every_outcome_is_counted_once(server: int) -> None:
    url = f"http://127.0.0.1:{server}"
    kinds = [
        b"o",
        b"o",
        b"r",
        b"e",
        b"s",
        b"c",
        b"o",
        b"r",
        b"o",
        b"o",
    ]  # 5 ok, 2 refused, 1 each of the rest
    bodies = [build_request(f"127.0.0.1:{server}", "/p", k) for k in kinds]
    records, lateness, seconds = run_open_loop(url, bodies, rate=200.0, seconds=0.5, timeout=1.0, seed=1)
    n = len(records)
    assert n == len(lateness) and n >= 40  # ~100 arrivals in 0.5 s at 200/s
    s = summarize(records, lateness, seconds, saturation_rps=100.0)
    cycles, rest = divmod(n, len(kinds))
    expect = dict.fromkeys(("ok", "refused", "errors", "timeouts", "conn_errors"), 0)
    names = {b"o": "ok", b"r": "refused", b"e": "errors", b"s": "timeouts", b"c": "conn_errors"}
    for i, k in enumerate(kinds):
        expect[names[k]] += cycles + (1 if i < rest else 0)
    assert {k: s[k] for k in expect} == expect
    assert s["requests"] == n and s["refused_without_retry_after"] == 0 and s["error_statuses"] == [500]
    assert s["goodput_ratio"] == pytest.approx(expect["ok"] / seconds / 100.0, abs=1e-3)
    timeouts = [r for r in records if r.outcome == "timeout"]
    assert all(0.99 <= r.done - r.scheduled < 1.5 for r in timeouts)  # cut at the timeout, from the schedule
    assert s["ok_p99_ms"] is not None and s["ok_p99_ms"] < 500


def test_arrivals_keep_their_schedule_while_answers_hang(server: int) -> None:
    """Open loop: requests that never return do not slow the next sends (a closed loop would stop)."""
    url = f"http://127.0.0.1:{server}"
    records, _, _ = run_open_loop(
        url, [build_request("x", "/p", b"s")], rate=300.0, seconds=0.5, timeout=0.8, seed=2
    )
    assert len(records) >= 100  # every arrival was sent although none was ever answered
    assert all(r.outcome == "timeout" for r in records)
    sent_late = sorted(r.sent - r.scheduled for r in records)
    assert sent_late[len(sent_late) // 2] < 0.05


def test_latency_counts_the_wait_for_a_connection(server: int) -> None:
    """Latency runs from the scheduled send: a request queued behind a busy connection is late (no
    coordinated omission), although the server answered it in 0.1 s once it got it."""
    url = f"http://127.0.0.1:{server}"
    records, lateness, seconds = run_open_loop(
        url, [build_request("x", "/p", b"d")], rate=40.0, seconds=0.5, timeout=10.0, max_connections=1, seed=3
    )
    s = summarize(records, lateness, seconds)
    assert s["ok"] == len(records) >= 8
    assert s["ok_p99_ms"] > 2 * 100 * 0.9  # the last ones waited for the ones before them
    assert max(r.done - r.sent for r in records) < 0.5  # each took ~0.1 s once sent


@pytest.mark.parametrize(("expiry_s", "fresh"), [(10.0, False), (0.002, True)])
def test_an_idle_connection_is_reused_only_within_its_expiry(
    server: int, expiry_s: float, fresh: bool
) -> None:
    """A server closes idle keep-alive connections after a while; the generator must not write a request on
    one as that happens, so it drops its own idle connections first (here: 2 ms, against ~100 ms between
    requests)."""
    url = f"http://127.0.0.1:{server}"
    before = len(ACCEPTED)
    records, _, _ = run_open_loop(
        url, [build_request("x", "/p", b"o")], rate=10.0, seconds=1.0, idle_expiry_s=expiry_s, seed=4
    )
    assert len(records) >= 4 and all(r.outcome == "ok" for r in records)
    opened = len(ACCEPTED) - before
    # reused: one connection (two if arrivals overlapped); expired: nearly one per request
    assert (opened >= len(records) - 2) if fresh else (opened <= 2), (opened, len(records))


def test_the_generator_runs_at_raised_priority_and_gives_it_back() -> None:
    """Root (CI) gets nice -10 for the generator's thread only while it runs; others keep their own."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    with generator_priority(-10) as nice:
        assert os.getpriority(os.PRIO_PROCESS, 0) == nice
        assert nice == (-10 if os.geteuid() == 0 else before)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
