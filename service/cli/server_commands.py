"""`actprompt serve` (the gateway; embedded mode by default) and `actprompt db upgrade`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

WALKTHROUGH = """\
actprompt is up: {url}   (OpenAPI: {url}/docs)
web console: {url}/console   (sign in with the admin key below, or a tenant's API key)
mode: {mode}   database: {database}
admin key: {admin_key}

Walkthrough (copy-paste into a second terminal as is; needs curl and jq):

  export AP={url} ADMIN={admin_key}
  # 0. a small dataset under the data root ({data_roots}): 3 colour classes, 40 images each,
  #    and one image to predict (walkthrough.png, in the current folder)
  mkdir -p {first_root} && {python} -c "
import numpy as np; from PIL import Image
rng = np.random.default_rng(0); y = np.repeat(np.arange(3), 40)
x = (rng.integers(0, 60, (120, 32, 32, 3)) + 150 * (y[:, None, None, None] == np.arange(3))).astype(np.uint8)
np.savez('{first_root}/walkthrough.npz', x_train=x, y_train=y, classes=np.array(['red', 'green', 'blue']))
Image.fromarray(x[40]).save('walkthrough.png')"
  # 1. a tenant and its API key
  export KEY=$(curl -s -X POST $AP/v1/tenants -H "Authorization: Bearer $ADMIN" \\
      -H 'Content-Type: application/json' -d '{{"name": "demo"}}' | jq -r .api_key)
  # 2. a backbone (admin): {weights_note}
  curl -s -X POST $AP/v1/backbones -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \\
      -d '{{"id": "resnet20", "model": "resnet20_cifar", "weights": "{weights}"}}' \\
      | jq -c '{{id, recommended_layer, layers: [.layers[] | "\\(.index) \\(.name)"]}}'
  # 3. a training job (an Idempotency-Key makes a retried POST return the same job)
  export JOB=$(curl -s -X POST $AP/v1/jobs -H "Authorization: Bearer $KEY" \\
      -H 'Content-Type: application/json' -H 'Idempotency-Key: walkthrough-1' \\
      -d '{{"backbone": "resnet20", "dataset_uri": "file://{first_root}/walkthrough.npz",
           "hyperparameters": {{"epochs": 3}}}}' | jq -r .id)
  # 4. live progress (the stream ends when the job does), then the result
  curl -sN $AP/v1/jobs/$JOB/events -H "Authorization: Bearer $KEY" -H 'Accept: text/event-stream'
  export PROMPT=$(curl -s $AP/v1/jobs/$JOB -H "Authorization: Bearer $KEY" | jq -r .prompt)
  # 5. predict (the image is class "green")
  curl -s -X POST $AP/v1/predict -H "Authorization: Bearer $KEY" -F prompt=$PROMPT -F images=@walkthrough.png
"""

#: Where the development checkout keeps the real ResNet-20 checkpoint (../shared beside the repository).
_LOCAL_RESNET20 = ("..", "shared", "weights", "resnet20-12fca82f.th")


def _walkthrough_weights() -> tuple[str, str]:
    """The local checkpoint when this checkout has one (offline, real accuracy), else random weights."""
    from pathlib import Path

    path = Path.cwd().joinpath(*_LOCAL_RESNET20).resolve()
    if path.is_file():
        return path.as_uri(), 'the local ResNet-20 checkpoint ("hub" loads timm\'s own weights online)'
    return "random", 'random weights, so it runs anywhere (give a file:// checkpoint or "hub" for accuracy)'


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.main import create_app, resolve_admin_key
    from service.db.migrate import DatabaseNotMigrated, check_migrated_url
    from service.settings import get_settings
    from workers.queues import train_queue

    settings = resolve_admin_key(get_settings())
    if not settings.should_auto_migrate:
        try:
            check_migrated_url(settings.database_url)
        except DatabaseNotMigrated as exc:
            print(f"actprompt: refusing to start: {exc}", file=sys.stderr)
            return 2
    url = f"http://{args.host}:{args.port}"
    roots = settings.data_root_paths
    weights, weights_note = _walkthrough_weights()
    print(
        WALKTHROUGH.format(
            url=url,
            mode="embedded (in-process job runner)"
            if settings.is_embedded
            else f"celery ({train_queue(settings)})",
            database=settings.database_url,
            admin_key=settings.admin_key or "(ACTPROMPT_ADMIN_KEY is not set: admin calls are refused)",
            data_roots=":".join(map(str, roots)),
            first_root=roots[0] if roots else "/data",
            python=sys.executable,
            weights=weights,
            weights_note=weights_note,
        ),
        flush=True,
    )
    # Open SSE streams would hold a graceful shutdown until their jobs end: give them 10 s.
    options = {"log_config": None, "access_log": False, "timeout_graceful_shutdown": 10}
    if args.workers <= 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, **options)  # type: ignore[arg-type]
        return 0
    # N processes share the listening socket; each builds its own app (backbones, prompt cache, batcher,
    # caches, in-process job runner), so the admin key is fixed here once for all of them.
    if settings.admin_key:
        os.environ["ACTPROMPT_ADMIN_KEY"] = settings.admin_key
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="actprompt-metrics-"))
    if not settings.torch_threads:  # N processes x every core each would oversubscribe the cores
        os.environ["ACTPROMPT_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    uvicorn.run(
        "service.api.main:create_app",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        **options,  # type: ignore[arg-type]
    )
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from service.db.migrate import upgrade
    from service.log import configure_logging
    from service.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    upgrade(settings.database_url, args.revision)
    print(f"database at revision {args.revision}: {settings.database_url}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the HTTP gateway (embedded SQLite + in-process jobs unless ACTPROMPT_BROKER_URL is set)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes sharing the port (each holds its own backbones and prompt cache; /metrics "
        "sums them); see docs/SERVING.md",
    )
    serve.set_defaults(func=_serve)

    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    up = db_sub.add_parser("upgrade", help="apply the Alembic migrations (ACTPROMPT_DATABASE_URL)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)
