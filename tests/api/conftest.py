"""Gateway test fixtures: a real database (SQLite file, or a fresh PostgreSQL database per run), an app with
its lifespan, tenants, a tiny random backbone and tiny generated datasets."""

from __future__ import annotations

import contextlib
import io
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text

from service.api.main import create_app
from service.db.session import make_engine
from service.settings import Settings
from tests.services import require
from tests.signal_data import CLASSES, square_images

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
ADMIN_KEY = "test-admin-key"
#: The tiny random CNN every plumbing test trains (32x32 keeps it fast on two cores).
TINY_BACKBONE = {"id": "tiny", "model": "test_resnet", "weights": "random", "input_size": [32, 32]}
TERMINAL = ("succeeded", "failed", "cancelled")


# --- databases ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_pg_database(prefix: str = "actprompt_test") -> Iterator[str]:
    """An empty PostgreSQL database with a random name (unmigrated); dropped on exit."""
    require("postgres")
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this run (random name), migrated once, dropped at the end."""
    from service.db.migrate import upgrade

    with fresh_pg_database() as url:
        upgrade(url)
        yield url


def _truncate(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("TRUNCATE job_events, checkpoints, prompts, jobs, api_keys, tenants, backbones CASCADE")
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'actprompt.db'}"
    url: str = request.getfixturevalue("pg_database")
    _truncate(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'actprompt.db'}"


# --- data --------------------------------------------------------------------------------------------
def make_images(
    n_per_class: int, num_classes: int = 3, size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: each class a colour channel and a stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(num_classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size, 3))
            img[..., c % 3] += 150
            if c % 2:
                img[::4, :, :] = 255
            else:
                img[:, ::4, :] = 255
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    x, y = make_images(12)
    xt, yt = make_images(4, seed=1)
    np.savez(
        root / "tiny.npz",
        x_train=x,
        y_train=y,
        x_test=xt,
        y_test=yt,
        classes=np.array(["red", "green", "blue"]),
    )
    xs, ys = square_images(192, seed=0)
    xst, yst = square_images(64, seed=1)
    np.savez(root / "squares.npz", x_train=xs, y_train=ys, x_test=xst, y_test=yst, classes=np.array(CLASSES))
    return root


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# --- the app -----------------------------------------------------------------------------------------
@dataclass
class Api:
    """A running app (lifespan entered) with the admin's headers and helpers."""

    client: TestClient
    settings: Settings

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def tenant(self, name: str = "acme") -> dict[str, str]:
        r = self.client.post("/v1/tenants", json={"name": name}, headers=self.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['api_key']}"}

    def tiny_backbone(self) -> dict[str, Any]:
        r = self.client.post("/v1/backbones", json=TINY_BACKBONE, headers=self.admin)
        assert r.status_code in (201, 409), r.text
        return dict(self.client.get("/v1/backbones/tiny", headers=self.admin).json())

    def job_body(self, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "backbone": "tiny",
            "dataset_uri": (Path(self.settings.data_roots) / "tiny.npz").as_uri(),
            "hyperparameters": {"epochs": 4, "batch_size": 8, "learning_rate": 0.1},
        }
        body.update(overrides)
        return body

    def wait(
        self, job_id: str, headers: dict[str, str], until: tuple[str, ...] = TERMINAL, timeout: float = 120
    ):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            if job["status"] in until:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not reach {until}: {job}")


def settings_for(database_url: str, data_root: Path, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "admin_key": ADMIN_KEY,
        "data_roots": str(data_root),
        "var_dir": tmp_path / "var",
        "device": "cpu",
        "log_json": True,
        "log_level": "WARNING",
        "heartbeat_seconds": 0.5,
        "cancel_poll_seconds": 0.1,
        "lease_seconds": 30,
        "progress_event_seconds": 0.5,
        "auto_migrate": True,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_api(database_url: str, data_root: Path, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Factory: `make_api(**settings_overrides)` → an `Api` whose lifespan runs until the test ends."""
    opened: list[TestClient] = []

    def factory(**overrides: Any) -> Api:
        settings = settings_for(database_url, data_root, tmp_path, **overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        opened.append(client)
        return Api(client=client, settings=settings)

    yield factory
    for client in reversed(opened):
        with contextlib.suppress(Exception):  # a test may have stopped it already (restart tests)
            client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()
