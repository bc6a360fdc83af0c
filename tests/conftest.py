"""Fixtures every test package shares: where the real weights and data lie, and a quiet torch."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The read-only folder beside the checkout with real pretrained weights and datasets (never committed).
SHARED_DIR = Path(os.environ.get("ACTPROMPT_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
WEIGHTS_DIR = SHARED_DIR / "weights"
DATA_DIR = SHARED_DIR / "data"

# Two cores on CI: one intra-op thread per test process keeps parallel subprocesses from thrashing.
torch.set_num_threads(int(os.environ.get("ACTPROMPT_TEST_THREADS", "2")))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a service fixture (directly or through another fixture) for its service."""
    from tests.services import SERVICE_FIXTURES

    for item in items:
        for name in getattr(item, "fixturenames", ()):
            service = SERVICE_FIXTURES.get(name)
            if service is not None and item.get_closest_marker(service) is None:
                item.add_marker(getattr(pytest.mark, service))


@pytest.fixture(autouse=True)
def _services_up(request: pytest.FixtureRequest) -> None:
    """Ping PostgreSQL / Redis before a test marked for them: one clear line when one is down."""
    from tests.services import require

    for service in ("postgres", "redis"):
        if request.node.get_closest_marker(service) is not None:
            require(service)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    assert WEIGHTS_DIR.is_dir(), f"real weights expected at {WEIGHTS_DIR}"
    return WEIGHTS_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), f"real datasets expected at {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(scope="session")
def resnet20_uri(weights_dir: Path) -> str:
    return (weights_dir / "resnet20-12fca82f.th").as_uri()


# --- S3 (moto's standalone server: a real S3-protocol server on 127.0.0.1, never mocked in-process) -------
@pytest.fixture(scope="session")
def s3_credentials() -> None:
    """boto3 reads test credentials from the environment, as production reads real ones."""
    from tests.services import S3_TEST_CREDENTIALS

    for key, value in S3_TEST_CREDENTIALS.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def s3_url(s3_credentials: None) -> str:
    """The shared S3 server, started when absent (and left running, as `.ci/run` leaves it)."""
    from tests.services import S3_URL, ensure_s3

    ensure_s3()
    return S3_URL


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


def new_bucket(url: str) -> str:
    name = f"t-{secrets.token_hex(6)}"
    s3_client(url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_url: str) -> str:
    """A fresh bucket of the shared server for this test."""
    return new_bucket(s3_url)


@dataclass
class PrivateS3:
    """A moto server of this test's own, which the test may freeze (SIGSTOP: requests hang, like a store
    that stopped answering) and thaw (SIGCONT: it answers again, its objects intact)."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        """Gone: connections are refused (and its objects are lost, as moto keeps them in memory)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        """A new, empty server on the same port."""
        from tests.services import start_moto

        self.proc = start_moto(int(self.url.rsplit(":", 1)[1]), self.log_path)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def client(self) -> Any:
        return s3_client(self.url)


@pytest.fixture
def private_s3(s3_credentials: None, tmp_path: Path) -> Iterator[PrivateS3]:
    from tests.api.serve import free_port
    from tests.services import start_moto

    port = free_port()
    server = PrivateS3(
        f"http://127.0.0.1:{port}", start_moto(port, tmp_path / "moto.log"), tmp_path / "moto.log"
    )
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGCONT)
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
