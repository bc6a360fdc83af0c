"""`actprompt serve --workers 2`: two front processes on one port, and one /metrics that sums them with the
engine process's."""

from __future__ import annotations

import base64
import re

import httpx
import pytest

from bench.serving_http import Server, _png, setup_tenants_and_prompts
from service.engine import BackboneSpec
from tests.conftest import WEIGHTS_DIR


@pytest.mark.slow
def test_two_workers_serve_and_metrics_sum_both() -> None:
    server = Server(args=["--workers", "2"])
    try:
        server.wait_ready()
        spec = BackboneSpec("resnet20_cifar", weights=(WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri())
        prompts = setup_tenants_and_prompts(server, spec, tenants=2, prompts=2)
        image = base64.b64encode(_png(0, (32, 32))).decode()
        n = 0
        for _ in range(6):
            for key, pid in prompts:
                with httpx.Client(base_url=server.url, timeout=60) as c:  # a new connection each time
                    r = c.post(
                        "/v1/predict",
                        json={"prompt": pid, "images": [image]},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                assert r.status_code == 200, r.text
                n += 1
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        pids = set(re.findall(r'actprompt_serving_engine_up\{endpoint="[^"]*",pid="(\d+)"\}', text))
        assert len(pids) == 2  # one scrape shows both fronts
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("actprompt_predict_requests_total{")
        )
        assert served == n  # summed over the processes, whichever one answered the scrape
        assert 'actprompt_jobs{status="queued"} 0.0' in text  # counted in the database once
    finally:
        server.stop()
