"""The deployment files, checked without a Docker engine (there is none on this machine).

docker-compose.yml must name the services of the production mode, run only real `actprompt` sub-commands
(parsed by the real CLI parser), health-check the long-running services, and reserve a GPU for the worker.
The Dockerfile must be multi-stage with a torch wheel index build argument and run `actprompt` by command.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
API_REPLICAS = ("api1", "api2", "api3")
REQUIRED_SERVICES = {"postgres", "redis", "migrate", *API_REPLICAS, "haproxy", "minio", "worker"}
ACTPROMPT_SERVICES = ("migrate", *API_REPLICAS, "api4", "scheduler", "worker", "worker-cpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED_SERVICES
    for name in ACTPROMPT_SERVICES:
        assert name in services, name


@pytest.mark.parametrize("name", ACTPROMPT_SERVICES)
def test_commands_are_real_actprompt_subcommands(services: dict[str, dict[str, Any]], name: str) -> None:
    """Every command parses with the real CLI parser (a typo or a removed option fails here)."""
    command = services[name]["command"]
    assert isinstance(command, list) and command, f"{name}: command must be an exec-form list"
    parser = build_parser()
    assert command[0] in _subcommands(parser), f"{name}: `actprompt {command[0]}` does not exist"
    try:
        args = parser.parse_args(command)
    except SystemExit as exc:  # argparse exits on unknown options
        pytest.fail(f"{name}: `actprompt {' '.join(command)}` does not parse ({exc})")
    assert callable(args.func)


def test_worker_roles(services: dict[str, dict[str, Any]]) -> None:
    parser = build_parser()
    gpu = parser.parse_args(services["worker"]["command"])
    assert gpu.device == "cuda" and gpu.queues == "actprompt.gpu" and not gpu.beat
    cpu = parser.parse_args(services["worker-cpu"]["command"])
    assert cpu.device == "cpu" and cpu.queues == "actprompt.cpu"
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    scheduler = parser.parse_args(services["scheduler"]["command"])
    assert scheduler.beat, "exactly one service must run the reaper schedule"
    beats = [
        n for n in ACTPROMPT_SERVICES if getattr(parser.parse_args(services[n]["command"]), "beat", False)
    ]
    assert beats == ["scheduler"]


def test_worker_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "cu" in services["worker"]["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]


@pytest.mark.parametrize(
    "name", ["postgres", "redis", *API_REPLICAS, "haproxy", "minio", "scheduler", "worker", "worker-cpu"]
)
def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name]["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) >= 2
    assert "interval" in check and "retries" in check


def test_dependencies_wait_for_health_and_migration(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"].get("restart") == "no"
    for name in (*API_REPLICAS, "scheduler", "worker", "worker-cpu"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_production_environment(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    for name in ACTPROMPT_SERVICES:
        env = services[name]["environment"]
        assert env["ACTPROMPT_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["ACTPROMPT_BROKER_URL"].startswith("redis://redis:6379"), name
    volumes = services["postgres"]["volumes"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in volumes)
    assert "pgdata" in compose["volumes"]


def test_dockerfile_stages_and_entrypoint() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE | re.IGNORECASE)
    names = [name for _image, name in stages]
    assert names == ["builder", "runtime"], stages
    assert all("slim" in image for image, _name in stages)
    assert re.search(r"^ARG TORCH_INDEX_URL=\S+/whl/cpu$", text, flags=re.MULTILINE)
    assert re.search(r'--index-url "\$\{TORCH_INDEX_URL\}"', text)
    assert re.search(r"^COPY --from=builder /opt/venv /opt/venv$", text, flags=re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["actprompt"\]$', text, flags=re.MULTILINE)
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.MULTILINE)
    assert cmd is not None
    default_command = yaml.safe_load(cmd.group(1))
    build_parser().parse_args(default_command)
    assert re.search(r"^USER (?!root)\S+$", text, flags=re.MULTILINE), "the runtime must not run as root"


def test_dockerignore_keeps_local_state_out() -> None:
    lines = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    assert {".git", ".venv", "var"} <= lines


def test_uploaded_files_are_on_a_volume_shared_by_api_and_workers(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """The api writes POST /v1/files into ACTPROMPT_FILES_DIR; every training worker must read the same."""
    files_dir = compose["x-actprompt-env"]["ACTPROMPT_FILES_DIR"]
    mounts = {
        name: [v.split(":")[0] for v in services[name].get("volumes", []) if v.split(":")[1] == files_dir]
        for name in (*API_REPLICAS, "worker", "worker-cpu")
    }
    assert all(m == ["files"] for m in mounts.values()), mounts
    assert "files" in compose["volumes"]
    assert not any(v.endswith(":ro") for v in services["api1"]["volumes"] if v.startswith("files:"))


def test_haproxy_fronts_every_api_replica(services: dict[str, dict[str, Any]]) -> None:
    """The shipped balancer config names the replica services by their compose names and serve port;
    only haproxy publishes the API."""
    cfg = (REPO_ROOT / "deploy" / "haproxy.cfg").read_text()
    haproxy = services["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    assert any(p.split(":")[-1].split()[0] == "8080" for p in haproxy["ports"])
    assert re.search(r'bind "\$\{ACTPROMPT_HAPROXY_BIND-:8080\}"', cfg)
    slots = re.findall(r'server (api\d) "\$\{ACTPROMPT_API\d-(\S+?):(\d+)\}"', cfg)
    assert {name for name, _host, _port in slots} == {"api1", "api2", "api3", "api4"}
    for name, host, port in slots:
        assert host == name and host in services, f"{name}: {host} is not a compose service"
        args = build_parser().parse_args(services[name]["command"])
        assert str(args.port) == port, name
        assert "ports" not in services[name], f"{name} must be reached through haproxy only"
    assert services["api4"]["profiles"] == ["spare"]


def test_haproxy_accepts_the_shipped_config(tmp_path: Path) -> None:
    """The real HAProxy parses deploy/haproxy.cfg (compose's names do not resolve here: those servers start
    down, which `-c` reports as a warning, not an error)."""
    import shutil
    import subprocess

    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    env = {"ACTPROMPT_HAPROXY_SOCKET": str(tmp_path / "haproxy.sock"), "PATH": "/usr/sbin:/usr/bin:/bin"}
    result = subprocess.run(
        [haproxy, "-c", "-f", str(REPO_ROOT / "deploy" / "haproxy.cfg")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_uploads_go_to_the_minio_bucket_by_default(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """Replicas on different nodes share no folder: by default the store is the minio service's bucket,
    which minio-init creates before any replica or training worker starts."""
    env = compose["x-actprompt-env"]
    assert re.fullmatch(r"\$\{ACTPROMPT_STORAGE_URL:-s3://actprompt/\S+\}", env["ACTPROMPT_STORAGE_URL"])
    assert env["ACTPROMPT_S3_ENDPOINT_URL"] == "${ACTPROMPT_S3_ENDPOINT_URL-http://minio:9000}"
    assert "store/actprompt" in services["minio-init"]["command"][0]
    for name in (*API_REPLICAS, "worker", "worker-cpu"):
        depends = services[name]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
