"""A multi-replica actprompt on one machine: PostgreSQL, Redis, S3, HAProxy, N API replicas, M workers.

Every part is a separate process, as on separate nodes: the replicas share nothing but the database, the
broker and the object store (moto's standalone S3 server, on its own port), each process has its own var
folder (caches, the workers' object cache), and HAProxy runs the shipped
`deploy/haproxy.cfg` with local addresses. `make fleet` runs it in the foreground; the end-to-end test
and `bench/fleet.py` drive it through :class:`Fleet`.

    python -m deploy.fleet [--replicas 3] [--workers 2] [--port 8080] [--keep]

PostgreSQL and Redis are the machine's own (started like `.ci/run` does when they are down); the fleet uses
a fresh database (dropped at the end unless --keep), its own Redis DB and its own queue names.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy.cfg"
#: Server slots in deploy/haproxy.cfg: api1..api3 plus one spare for scale-up.
SLOTS = 4
PG_ADMIN_URL = os.environ.get("ACTPROMPT_FLEET_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ACTPROMPT = str(Path(sys.executable).with_name("actprompt"))
S3_BUCKET = "actprompt-fleet"
#: moto accepts any credentials; boto3 needs some to sign with. A real store's come from the environment.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fleet", "AWS_SECRET_ACCESS_KEY": "fleet-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One process of the fleet, in its own process group (killed as a group), logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@dataclass
class Fleet:
    """The processes of one local deployment; `start()` brings it up, `stop()` takes all of it down."""

    root: Path
    replicas: int = 3
    workers: int = 2
    balancer_port: int = 0
    stats_port: int = 0
    s3_port: int = 0
    redis_db: int = int(os.environ.get("ACTPROMPT_FLEET_REDIS_DB", "6"))
    extra_env: dict[str, str] = field(default_factory=dict)
    keep_database: bool = False
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    ports: list[int] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.balancer_port = self.balancer_port or free_port()
        self.stats_port = self.stats_port or free_port()
        self.s3_port = self.s3_port or free_port()
        self.ports = self.ports or [free_port() for _ in range(SLOTS)]
        self.database = f"actprompt_fleet_{self.tag}"

    # --- addresses ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The balancer: what clients use."""
        return f"http://127.0.0.1:{self.balancer_port}"

    def replica_url(self, i: int) -> str:
        """Replica `i` (1-based, as api1..api4 in the HAProxy config) directly, bypassing the balancer."""
        return f"http://127.0.0.1:{self.ports[i - 1]}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def database_url(self) -> str:
        return PG_URL.format(name=self.database)

    @property
    def socket_path(self) -> Path:
        return self.root / "haproxy.sock"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    def env(self) -> dict[str, str]:
        """What every actprompt process of the fleet reads (service/settings.py)."""
        env = dict(os.environ)
        env.update(
            {
                "ACTPROMPT_DATABASE_URL": self.database_url,
                "ACTPROMPT_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
                "ACTPROMPT_JOB_QUEUE": f"actprompt.fleet.{self.tag}.cpu",
                "ACTPROMPT_ADMIN_KEY": self.admin_key,
                "ACTPROMPT_DEVICE": "cpu",
                "ACTPROMPT_DATA_ROOTS": str(self.data_root),
                # Uploads go to the object store every node reaches; no folder is shared.
                "ACTPROMPT_STORAGE_URL": f"s3://{S3_BUCKET}/files",
                "ACTPROMPT_S3_ENDPOINT_URL": self.s3_url,
                "ACTPROMPT_S3_REGION": "us-east-1",
                **S3_CREDENTIALS,
                "ACTPROMPT_LOG_JSON": "true",
                "ACTPROMPT_LOG_LEVEL": "INFO",
                # Many processes on few cores: one intra-op thread each.
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "ACTPROMPT_TORCH_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def haproxy_env(self, predict_balance: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ACTPROMPT_HAPROXY_BIND": f"127.0.0.1:{self.balancer_port}",
                "ACTPROMPT_HAPROXY_STATS_BIND": f"127.0.0.1:{self.stats_port}",
                "ACTPROMPT_HAPROXY_SOCKET": str(self.socket_path),
                **{f"ACTPROMPT_API{i}": f"127.0.0.1:{p}" for i, p in enumerate(self.ports, 1)},
            }
        )
        if predict_balance:
            env["ACTPROMPT_PREDICT_BALANCE"] = predict_balance
        return env

    # --- life cycle --------------------------------------------------------------------------------
    def start(self, *, timeout: float = 240.0, predict_balance: str | None = None) -> None:
        """Everything up and ready: /readyz of every replica, every replica UP in HAProxy."""
        ensure_postgres()
        ensure_redis()
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._create_database()
        try:
            self._run_once("migrate", [ACTPROMPT, "db", "upgrade"], timeout=180)
            self.start_s3()
            self.start_haproxy(predict_balance)
            for i in range(1, self.replicas + 1):
                self.start_replica(i)
            for j in range(1, self.workers + 1):
                self.start_worker(j)
            deadline = time.monotonic() + timeout
            for i in range(1, self.replicas + 1):
                self.wait_replica_ready(i, deadline - time.monotonic())
            self.wait_balanced(range(1, self.replicas + 1), deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        if not self.keep_database:
            self._drop_database()

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str]) -> Proc:
        old = self.procs.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"{name} is already running")
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                cmd,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self.procs[name] = Proc(name, popen, log_path)
        return self.procs[name]

    def _run_once(self, name: str, cmd: list[str], *, timeout: float) -> None:
        proc = self._spawn(name, cmd, self.env())
        try:
            rc = proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.stop()
            raise RuntimeError(f"{name} did not finish in {timeout} s: {proc.log_tail()}") from None
        if rc != 0:
            raise RuntimeError(f"{name} failed (exit {rc}): {proc.log_tail()}")

    def start_s3(self) -> Proc:
        """moto's standalone S3 server on its own port, with the fleet's bucket."""
        moto = str(Path(sys.executable).with_name("moto_server"))
        proc = self._spawn("s3", [moto, "-H", "127.0.0.1", "-p", str(self.s3_port)], os.environ)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.put(f"{self.s3_url}/{S3_BUCKET}", timeout=2).status_code == 200:  # CreateBucket
                    return proc
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the S3 server did not start: {proc.log_tail()}")
            time.sleep(0.2)

    def start_replica(self, i: int) -> Proc:
        """API replica `i` (1..4): `actprompt serve --workers 1` on its slot's port, its own var folder."""
        env = self.env()
        env["ACTPROMPT_VAR_DIR"] = str(self.root / f"var-api{i}")
        cmd = [ACTPROMPT, "serve", "--host", "127.0.0.1", "--port", str(self.ports[i - 1]), "--workers", "1"]
        return self._spawn(f"api{i}", cmd, env)

    def start_worker(self, j: int) -> Proc:
        """Worker `j`: trains the fleet's queue; worker 1 also runs the reaper's schedule (`--beat`)."""
        env = self.env()
        env["ACTPROMPT_VAR_DIR"] = str(self.root / f"var-worker{j}")
        cmd = [ACTPROMPT, "worker", "--device", "cpu", "--queues", env["ACTPROMPT_JOB_QUEUE"]]
        cmd += ["--hostname", f"fleet{j}@{self.tag}"]
        if j == 1:
            cmd += ["--beat", "--maintenance-queue", f"actprompt.fleet.{self.tag}.maintenance"]
        return self._spawn(f"worker{j}", cmd, env)

    def start_haproxy(self, predict_balance: str | None = None) -> Proc:
        """HAProxy in the foreground (-db) on the shipped config; `predict_balance` overrides the hash."""
        self.stop_haproxy()
        cmd = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(HAPROXY_CFG)]
        proc = self._spawn("haproxy", cmd, self.haproxy_env(predict_balance))
        deadline = time.monotonic() + 15
        while not self.socket_path.exists() or not _port_open(self.balancer_port):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {proc.log_tail()}")
            time.sleep(0.1)
        return proc

    def stop_haproxy(self) -> None:
        proc = self.procs.get("haproxy")
        if proc is not None:
            proc.stop()
        self.socket_path.unlink(missing_ok=True)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process of the fleet (its whole group): `kill("api2")` is a replica's node going away."""
        self.procs[name].signal(sig)
        self.procs[name].proc.wait(30)

    def wait_replica_ready(self, i: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[f"api{i}"]
        while True:
            if not proc.alive():
                raise RuntimeError(f"api{i} exited: {proc.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.replica_url(i)}/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"api{i} not ready: {proc.log_tail()}")
            time.sleep(0.3)

    def wait_balanced(self, replicas: Iterable[int], timeout: float) -> None:
        """Until HAProxy's health checks see every one of `replicas` UP (in both backends)."""
        want = {f"api{i}" for i in replicas}
        deadline = time.monotonic() + timeout
        while True:
            up = {
                srv
                for (be, srv), row in self.haproxy_stats().items()
                if be == "predict" and row["status"] == "UP"
            }
            if want <= up:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy sees {sorted(up)} up, expected {sorted(want)}")
            time.sleep(0.2)

    # --- HAProxy runtime API -----------------------------------------------------------------------
    def haproxy_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def haproxy_stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """`show stat` as {(backend, server): row}: `status` (UP/DOWN/MAINT), `stot` (requests sent)..."""
        text = self.haproxy_command("show stat").lstrip("# ")
        return {
            (row["pxname"], row["svname"]): row
            for row in csv.DictReader(io.StringIO(text))
            if row.get("svname") not in (None, "FRONTEND", "BACKEND")
        }

    def served(self, backend: str = "predict") -> dict[str, int]:
        """Requests HAProxy has sent to each server of `backend` since it started."""
        return {
            srv: int(row["stot"] or 0) for (be, srv), row in self.haproxy_stats().items() if be == backend
        }

    # --- database ----------------------------------------------------------------------------------
    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{self.database}"')

    def _drop_database(self) -> None:
        import psycopg

        with contextlib.suppress(psycopg.Error), psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.5)


def ensure_postgres() -> None:
    """The machine's PostgreSQL, started the way `.ci/run` starts it when it does not answer."""
    ready = ["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]
    if subprocess.run(ready).returncode == 0:
        return
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
    _wait(lambda: subprocess.run(ready).returncode == 0, "PostgreSQL")


def ensure_redis() -> None:
    """The machine's Redis on 6379, started like `.ci/run` does when it does not answer."""
    ping = ["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "ping"]
    if subprocess.run(ping, capture_output=True).returncode == 0:
        return
    server = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(REDIS_PORT)]
    subprocess.run([*server, "--save", ""], check=True)
    _wait(lambda: subprocess.run(ping, capture_output=True).returncode == 0, "Redis")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=3, choices=range(1, SLOTS + 1))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=8080, help="the balancer's port")
    parser.add_argument("--stats-port", type=int, default=8404, help="HAProxy's stats page and /metrics")
    parser.add_argument("--root", type=Path, default=None, help="logs, files, caches (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the folder at the end")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="actprompt-fleet-"))
    fleet = Fleet(
        root,
        replicas=args.replicas,
        workers=args.workers,
        balancer_port=args.port,
        stats_port=args.stats_port,
        keep_database=args.keep,
    )
    print(f"starting the fleet under {root} (logs in {root / 'logs'}) ...", flush=True)
    fleet.start()
    print(
        f"actprompt fleet is up: {fleet.url}  (HAProxy stats: http://127.0.0.1:{fleet.stats_port}/stats)\n"
        f"admin key: {fleet.admin_key}\n"
        f"replicas: {', '.join(fleet.replica_url(i) for i in range(1, args.replicas + 1))}\n"
        f"database: {fleet.database_url}   S3: {fleet.s3_url} (bucket {S3_BUCKET})\n"
        f"data root (file:// datasets): {fleet.data_root}\n"
        "Ctrl-C stops every process.",
        flush=True,
    )
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            dead = [p.name for p in fleet.procs.values() if p.name != "migrate" and not p.alive()]
            if dead:
                print(f"exited: {', '.join(dead)} (see {root / 'logs'})", flush=True)
            time.sleep(1 if not dead else 5)
    finally:
        fleet.stop()
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
