"""Drive `wrk` (a C load generator, /usr/bin/wrk) with prepared request bodies, and read its numbers back.

Bodies, content types and Authorization headers are written to files that a small Lua script loads once
per wrk thread and cycles through, so the load generator builds no request at run time. Its own CPU time is
measured (``resource`` children usage) and reported beside the result.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LUA = r"""
local dir = "%(dir)s"
local n = %(n)d
local bodies, heads = {}, {}
for k = 1, n do
  local f = io.open(dir .. "/body" .. k, "rb"); bodies[k] = f:read("*all"); f:close()
  f = io.open(dir .. "/head" .. k, "rb")
  local h = {}
  for line in f:read("*all"):gmatch("[^\n]+") do
    local name, value = line:match("^([^:]+): (.*)$")
    h[name] = value
  end
  f:close()
  heads[k] = h
end
local i = math.random(n)
local threads = {}
setup = function(thread) table.insert(threads, thread) end
statuses = {}
response = function(status, headers, body)
  local k = tostring(status)
  statuses[k] = (statuses[k] or 0) + 1
end
request = function()
  i = (i %% n) + 1
  return wrk.format("POST", "%(path)s", heads[i], bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do table.insert(parts, string.format("\"%%s\": %%d", k, v)) end
  io.write("WRKSTATUS {" .. table.concat(parts, ", ") .. "}\n")
  io.write(string.format(
    "WRKJSON {\"requests\": %%d, \"duration_us\": %%d, \"status_errors\": %%d, \"socket_errors\": %%d, " ..
    "\"p50_ms\": %%.3f, \"p90_ms\": %%.3f, \"p99_ms\": %%.3f, \"mean_ms\": %%.3f}\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.mean / 1000))
end
"""


@dataclass(frozen=True)
class Request:
    body: bytes
    content_type: str
    authorization: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # any others (e.g. a routing key)

    def header_lines(self) -> str:
        pairs = [("Content-Type", self.content_type), *self.headers]
        if self.authorization:
            pairs.append(("Authorization", self.authorization))
        return "".join(f"{k}: {v}\n" for k, v in pairs)


def run_wrk(
    url: str, path: str, requests: list[Request], *, connections: int, seconds: float, threads: int = 1
) -> dict[str, Any]:
    """One closed-loop run: ``connections`` keep-alive connections for ``seconds``; rates and latency."""
    with tempfile.TemporaryDirectory(prefix="wrk-bodies-") as tmp:
        d = Path(tmp)
        for k, r in enumerate(requests, start=1):
            (d / f"body{k}").write_bytes(r.body)
            (d / f"head{k}").write_text(r.header_lines())
        script = d / "post.lua"
        script.write_text(_LUA % {"dir": tmp, "n": len(requests), "path": path})
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [
                "wrk",
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"WRKJSON (\{.*\})", out)
    if match is None:
        raise RuntimeError(f"wrk gave no result: {out[-2000:]}")
    res: dict[str, Any] = json.loads(match.group(1))
    codes = re.search(r"WRKSTATUS (\{.*\})", out)
    # answers per HTTP status, so a run says whether its non-2xx were refusals (503), deadlines or faults
    res["statuses"] = {k: int(v) for k, v in sorted(json.loads(codes.group(1)).items())} if codes else {}
    wall = res["duration_us"] / 1e6
    status_errors = res.pop("status_errors")
    # Throughput counts 2xx answers only: a fast 503 from admission control is a refusal, not work done.
    res["rps"] = round((res["requests"] - status_errors) / wall, 2)
    res["answered_rps"] = round(res["requests"] / wall, 2)
    res["errors"] = status_errors + res.pop("socket_errors")
    res["connections"] = connections
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["load_generator_cpu_share"] = round(cpu / wall, 3)  # cores the load generator itself used
    return res
