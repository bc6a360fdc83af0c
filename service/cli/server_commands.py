"""`actprompt serve` (the gateway; embedded mode by default) and `actprompt db upgrade`."""

from __future__ import annotations

import argparse
import os
import sys

WALKTHROUGH = """\
actprompt is up: {url}   (OpenAPI: {url}/docs)
web console: {url}/console   (sign in with the admin key below, or a tenant's API key)
mode: {mode}   processes: {layout}   database: {database}
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
    single = args.single_process
    workers = args.workers or os.cpu_count() or 1
    endpoint = None
    if not single:  # before anything imports prometheus_client: every process shares one metrics folder
        from service.launch.serve import prepare_environment

        endpoint = prepare_environment(workers)

    from service.db.migrate import DatabaseNotMigrated, check_migrated_url
    from service.domain.tenants import resolve_admin_key
    from service.settings import get_settings
    from workers.queues import train_queue

    settings = resolve_admin_key(get_settings())
    if not settings.should_auto_migrate:
        try:
            check_migrated_url(settings.database_url)
        except DatabaseNotMigrated as exc:
            print(f"actprompt: refusing to start: {exc}", file=sys.stderr)
            return 2
    # every process builds its app from the environment, so the admin key is fixed here once for all
    if settings.admin_key:
        os.environ["ACTPROMPT_ADMIN_KEY"] = settings.admin_key
    url = f"http://{args.host}:{args.port}"
    roots = settings.data_root_paths
    weights, weights_note = _walkthrough_weights()
    print(
        WALKTHROUGH.format(
            url=url,
            mode="embedded (in-process job runner)"
            if settings.is_embedded
            else f"celery ({train_queue(settings)})",
            layout="one process (engine inside)"
            if single
            else f"1 engine process + {workers} front process{'es' if workers > 1 else ''}",
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
    # Refused predicts are answered by the HTTP protocol itself, before any ASGI task (shedding_protocol).
    options: dict[str, object] = {
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        "http": "service.api.shedding_protocol:SheddingHttpToolsProtocol",
    }
    if single:
        import uvicorn

        from service.api.main import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, **options)  # type: ignore[arg-type]
        return 0
    from service.launch.serve import run
    from service.log import configure_logging

    configure_logging(settings.log_level, json_lines=settings.log_json)  # the supervisor's own lines
    assert endpoint is not None
    return run(
        endpoint,
        host=args.host,
        port=args.port,
        workers=workers,
        engine_threads=settings.torch_threads or os.cpu_count() or 1,
        options=options,
    )


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
        default=0,
        help="HTTP front processes sharing the port (default: one per core); they feed one engine process "
        "that holds the backbones and the prompt cache; see docs/SERVING.md",
    )
    serve.add_argument(
        "--single-process",
        action="store_true",
        help="run the engine inside the one HTTP process (no engine process; --workers is ignored)",
    )
    serve.set_defaults(func=_serve)

    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    up = db_sub.add_parser("upgrade", help="apply the Alembic migrations (ACTPROMPT_DATABASE_URL)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)
