"""The `actprompt` console script: one argparse tree, each command group in its own module.

Command groups register themselves through `add_commands(subparsers)`; a group whose optional
dependencies fail to import is simply absent, so `actprompt layers` never needs FastAPI.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Modules that define `add_commands(subparsers: argparse._SubParsersAction) -> None`.
COMMAND_MODULES: tuple[str, ...] = (
    "service.cli.engine_commands",  # layers, train, predict
    "service.cli.server_commands",  # serve, db
    "service.cli.worker_commands",  # worker
    "service.cli.remote_commands",  # files, jobs, prompts, evaluations (a running server, via the client)
    "service.cli.admin_commands",  # admin tenants|keys|backbones (a running server, via the client)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actprompt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run; each command sets `func(args) -> int` on its sub-parser."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
