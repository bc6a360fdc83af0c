"""CPU profile of the gateway's own work for one predict request (the event loop's share), before/after.

The app runs in this process behind httpx's ASGI transport; cProfile watches the event loop thread while
``--requests`` sequential one-image JSON predicts go through auth, rate limit, prompt resolution, parsing,
the batcher's loop side and response encoding. The forward pass runs on the model thread and is not in
this profile (its time is the model's, measured by bench/serving_http.py). ``--repo`` profiles another
checkout (e.g. another worktree) with the same script: ``python bench/profile_request.py --repo ../other``.
The ResNet-20 weights come from ``bench.common.WEIGHTS_DIR`` (``ACTPROMPT_SHARED_DIR`` overrides it).

    python bench/profile_request.py [--repo PATH] [--requests 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.repo))
    import httpx
    import numpy as np
    from PIL import Image

    from service.api.main import create_app
    from service.engine import BackboneSpec, create_backbone
    from service.settings import Settings

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import WEIGHTS_DIR
    from bench.synthetic import random_artifact

    weights = (WEIGHTS_DIR / "resnet20-12fca82f.th").as_uri()
    tmp = Path(tempfile.mkdtemp(prefix="profile-request-"))
    settings = Settings(
        database_url=f"sqlite:///{tmp / 'p.db'}",
        admin_key="profile-admin",
        var_dir=tmp / "var",
        data_roots=str(tmp),
        device="cpu",
        log_level="WARNING",
        auto_migrate=True,
        embedded_worker=False,
        rate_limit_per_second=1e6,
        rate_limit_burst=1_000_000,
    )
    app = create_app(settings)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    body = {"images": [base64.b64encode(buf.getvalue()).decode()], "top_k": 3}
    admin = {"Authorization": "Bearer profile-admin"}

    async def run() -> tuple[pstats.Stats, float]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x", timeout=60) as c:
                key = (await c.post("/v1/tenants", json={"name": "p"}, headers=admin)).json()["api_key"]
                auth = {"Authorization": f"Bearer {key}"}
                await c.post(
                    "/v1/backbones",
                    json={"id": "r20", "model": "resnet20_cifar", "weights": weights},
                    headers=admin,
                )
                art = random_artifact(
                    create_backbone(BackboneSpec("resnet20_cifar", weights=weights), "cpu"),
                    layers=[5],
                    num_classes=10,
                    seed=0,
                )
                files = {"artifact": ("a.safetensors", art.to_bytes(), "application/octet-stream")}
                pid = (await c.post("/v1/prompts", files=files, headers=auth)).json()["id"]
                for _ in range(20):  # warm: backbone built, prompt resident
                    (
                        await c.post("/v1/predict", json={**body, "prompt": pid}, headers=auth)
                    ).raise_for_status()
                prof = cProfile.Profile()
                t0 = time.process_time()
                prof.enable()
                for _ in range(args.requests):
                    (
                        await c.post("/v1/predict", json={**body, "prompt": pid}, headers=auth)
                    ).raise_for_status()
                prof.disable()
                cpu = time.process_time() - t0
        return pstats.Stats(prof), cpu

    stats, cpu = asyncio.run(run())
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(25)
    report = (
        f"repo: {args.repo}\nprocess CPU per request (all threads, model included): "
        f"{1000 * cpu / args.requests:.2f} ms\n"
        f"event-loop thread, profiled, per request: {1000 * stats.total_tt / args.requests:.2f} ms\n"  # type: ignore[attr-defined]
        + text.getvalue()
    )
    if args.out:
        args.out.write_text(report)
    print(report[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
