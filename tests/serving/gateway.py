"""An in-process gateway with tenants and prompts, for the serving tests that go through HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.main import create_app
from service.engine.artifacts import PromptArtifact
from service.settings import Settings

ADMIN = "serving-test-admin-key"
LAYERS = [(1,), (5,), (8,), (10,), (3, 9)]


def png_b64(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Gateway:
    client: TestClient
    tenants: list[dict[str, str]]  # auth headers per tenant
    prompts: list[tuple[int, str]]  # (tenant index, prompt id)

    def predict(self, tenant: int, body: dict[str, Any]) -> Any:
        return self.client.post("/v1/predict", json=body, headers=self.tenants[tenant])


@pytest.fixture()
def make_gateway(
    tmp_path: Path, resnet20_uri: str, make_artifact: Callable[..., PromptArtifact]
) -> Iterator[Callable[..., Gateway]]:
    opened: list[TestClient] = []

    def make(n_tenants: int = 3, per_tenant: int = 2, **overrides: Any) -> Gateway:
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path / f'serving{len(opened)}.db'}",
            "admin_key": ADMIN,
            "var_dir": tmp_path / "var",
            "data_roots": str(tmp_path),
            "device": "cpu",
            "log_level": "WARNING",
            "auto_migrate": True,
            "embedded_worker": False,
            "serving_max_wait_ms": 20.0,
            "serving_queue_budget_ms": 60_000.0,  # bursts of correctness checks; admission: test_split
            "rate_limit_per_second": 1000.0,
            "rate_limit_burst": 1000.0,
            **overrides,
        }
        client = TestClient(create_app(Settings(**values)))
        client.__enter__()
        opened.append(client)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        body = {"id": "r20", "model": "resnet20_cifar", "weights": resnet20_uri}
        assert client.post("/v1/backbones", json=body, headers=admin).status_code == 201
        tenants = []
        for i in range(n_tenants):
            r = client.post("/v1/tenants", json={"name": f"t{i}"}, headers=admin)
            assert r.status_code == 201, r.text
            tenants.append({"Authorization": f"Bearer {r.json()['api_key']}"})
        prompts = []
        for i in range(n_tenants * per_tenant):
            art = make_artifact(200 + i, LAYERS[i % len(LAYERS)], num_classes=4 + i % 3)
            files = {"artifact": ("a.safetensors", art.to_bytes(), "application/octet-stream")}
            r = client.post("/v1/prompts", files=files, headers=tenants[i % n_tenants])
            assert r.status_code == 201, r.text
            prompts.append((i % n_tenants, r.json()["id"]))
        return Gateway(client, tenants, prompts)

    yield make
    for client in reversed(opened):
        client.__exit__(None, None, None)
