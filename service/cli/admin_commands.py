"""`actprompt admin tenants|keys|backbones …`: the admin's calls on a running server, through the client.

The key is `--api-key`, else $ACTPROMPT_ADMIN_KEY (the server's admin key), else $ACTPROMPT_API_KEY (a
tenant key with the `admin` scope manages its own tenant's keys). Output and errors as every remote
command: a table or `--json`, and `error <status> <code>: <message>` with exit status 1.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actprompt import Client
from actprompt.types import SCOPES, ApiKeyCreated, TenantCreated

from service.cli.remote_commands import (
    Actions,
    _emit,
    _emit_table,
    command_adders,
    done_command,
    show_command,
)


def _key(args: argparse.Namespace) -> None:
    args.api_key = args.api_key or os.environ.get("ACTPROMPT_ADMIN_KEY") or None


def _emit_secret(
    args: argparse.Namespace, created: TenantCreated | ApiKeyCreated, human: Callable[[Any], str]
) -> None:
    """A new key's answer; with --key-only just its secret (for `export KEY=$(…)`)."""
    if args.key_only:
        print(created.api_key)
    else:
        _emit(args, created, human)


# --- tenants ----------------------------------------------------------------------------------------
def tenants_create(args: argparse.Namespace, c: Client) -> int:
    t = c.tenants.create(args.name)
    _emit_secret(args, t, lambda t: f"{t.id}  {t.name}  first key {t.key_id}: {t.api_key}  (shown only now)")
    return 0


def tenants_list(args: argparse.Namespace, c: Client) -> int:
    header = ["ID", "NAME", "CREATED"]
    _emit_table(args, c.tenants.list(), header, lambda t: [t.id, t.name, t.created_at.isoformat()])
    return 0


def tenants_get(args: argparse.Namespace, c: Client) -> int:
    _emit(args, c.tenants.get(args.id), lambda t: f"{t.id}  {t.name}  created {t.created_at.isoformat()}")
    return 0


# --- keys -------------------------------------------------------------------------------------------
def keys_create(args: argparse.Namespace, c: Client) -> int:
    k = c.keys.create(args.tenant, name=args.name, scopes=args.scope)
    _emit_secret(args, k, lambda k: f"{k.id}  scopes {','.join(k.scopes)}: {k.api_key}  (shown only now)")
    return 0


def keys_list(args: argparse.Namespace, c: Client) -> int:
    header = ["ID", "KEY", "NAME", "SCOPES", "STATE"]
    _emit_table(
        args,
        c.keys.list(args.tenant),
        header,
        lambda k: [
            k.id,
            f"{k.prefix}…",
            k.name or "",
            ",".join(k.scopes),
            "revoked" if k.revoked_at else "active",
        ],
    )
    return 0


keys_revoke = done_command(lambda c, ref: c.keys.revoke(ref), "revoked")


# --- backbones --------------------------------------------------------------------------------------
def _weights(value: str) -> str:
    """A local checkpoint path becomes the file:// URI the API takes; "hub", "random" and URIs pass."""
    if value in ("hub", "random") or "://" in value:
        return value
    return Path(value).resolve().as_uri()


def backbones_create(args: argparse.Namespace, c: Client) -> int:
    b = c.backbones.create(
        args.id,
        model=args.model,
        weights=_weights(args.weights),
        input_size=tuple(args.input_size) if args.input_size else None,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
    )
    _emit(args, b, lambda b: f"{b.id}  {b.model}  {b.num_layers + 1} layers  input {b.input_size}")
    return 0


def backbones_list(args: argparse.Namespace, c: Client) -> int:
    header = ["ID", "MODEL", "FAMILY", "WEIGHTS"]
    _emit_table(args, c.backbones.list(), header, lambda b: [b.id, b.model, b.family, b.weights])
    return 0


backbones_get = show_command(lambda c, ref: c.backbones.get(ref))


backbones_delete = done_command(lambda c, ref: c.backbones.delete(ref))


def add_commands(subparsers: Actions) -> None:
    admin = subparsers.add_parser("admin", help="tenants, API keys and backbones on a server (the admin key)")
    resources = admin.add_subparsers(dest="admin_command", metavar="RESOURCE", required=True)
    group, command = command_adders(resources, prefix="admin_", before=_key)

    g = group("tenants", "create and list tenants")
    p = command(g, "create", tenants_create, "create a tenant and its first key (every scope)")
    p.add_argument("name")
    p.add_argument("--key-only", action="store_true", help="print only the new key (for `export KEY=$(…)`)")
    command(g, "list", tenants_list, "list tenants")
    command(g, "get", tenants_get, "show a tenant").add_argument("id")

    g = group("keys", "a tenant's API keys and their scopes")
    p = command(g, "create", keys_create, "issue a key (its secret is shown once)")
    p.add_argument("tenant", help="ten_… id")
    p.add_argument("--name", default=None)
    p.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        help="what the key may do (repeatable; default: every scope)",
    )
    p.add_argument("--key-only", action="store_true", help="print only the new key")
    command(g, "list", keys_list, "list a tenant's keys").add_argument("tenant")
    command(g, "revoke", keys_revoke, "revoke a key (refused at once)").add_argument("id")

    g = group("backbones", "register the frozen models tenants train on")
    p = command(g, "create", backbones_create, "register a timm model")
    p.add_argument("id", help="the name tenants use, e.g. resnet20")
    p.add_argument("--model", required=True, help="timm model name, e.g. resnet20_cifar or resnet18.a1_in1k")
    p.add_argument("--weights", default="hub", help='"hub", "random", or a checkpoint path / file:// URI')
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    command(g, "list", backbones_list, "list backbones")
    command(g, "get", backbones_get, "show a backbone and its layers").add_argument("id")
    command(g, "delete", backbones_delete, "delete a backbone").add_argument("id")
