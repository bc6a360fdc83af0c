"""Fixtures every test package shares: where the real weights and data lie, and a quiet torch."""

from __future__ import annotations

import os
from pathlib import Path

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
