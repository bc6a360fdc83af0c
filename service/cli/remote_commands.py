"""Commands that drive a running server through the light client: files, jobs, prompts, evaluations, predict.

Every command takes `--base-url`/`--api-key` (default: ACTPROMPT_BASE_URL / ACTPROMPT_API_KEY) and `--json`
(one JSON document, or JSON lines for `watch`, for scripts). API errors print as `error <status> <code>:
<message>` on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from actprompt import Client
from actprompt._errors import ActpromptError, APIError
from actprompt.states import EvaluationStatus, JobStatus
from pydantic import BaseModel


def remote_options() -> argparse.ArgumentParser:
    """Options every remote command shares (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--base-url", default=None, help="server URL (default: $ACTPROMPT_BASE_URL)")
    p.add_argument("--api-key", default=None, help="tenant API key (default: $ACTPROMPT_API_KEY)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _client(args: argparse.Namespace) -> Client:
    return Client(base_url=args.base_url, api_key=args.api_key)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _json_text(value: Any) -> str:
    return json.dumps(_dump(value), indent=2)


def _emit(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> None:
    print(_json_text(value) if args.json else human(value))


def _emit_table(
    args: argparse.Namespace, items: Iterable[Any], header: list[str], row: Callable[[Any], list[str]]
) -> None:
    """A listing: one JSON array with --json, else an aligned table of one `row` an item."""
    _emit(args, list(items), lambda xs: _table((row(x) for x in xs), header))


Command = Callable[[argparse.Namespace, Client], int]


def show_command(get: Callable[[Client, str], Any]) -> Command:
    """The command that prints, as JSON, the resource `get` returns for the `id` argument."""

    def show(args: argparse.Namespace, c: Client) -> int:
        _emit(args, get(c, args.id), _json_text)
        return 0

    return show


def done_command(act: Callable[[Client, str], None], verb: str = "deleted") -> Command:
    """The command that runs `act` (a delete, a revoke) on the `id` argument: `{"id": ..., verb: true}`."""

    def done(args: argparse.Namespace, c: Client) -> int:
        act(c, args.id)
        _emit(args, {"id": args.id, verb: True}, lambda _: f"{verb} {args.id}")
        return 0

    return done


def run_remote(func: Callable[[argparse.Namespace, Client], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: build the client, turn API errors into one line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return func(args, client)
        except APIError as exc:
            if args.json:
                body = {
                    "error": {
                        "status": exc.status,
                        "code": exc.code,
                        "message": exc.message,
                        "param": exc.param,
                    }
                }
                print(json.dumps(body), file=sys.stderr)
            else:
                print(f"error {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except (ActpromptError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _table(rows: Iterable[list[str]], header: list[str]) -> str:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# --- files ------------------------------------------------------------------------------------------
def files_upload(args: argparse.Namespace, c: Client) -> int:
    f = c.files.upload(args.path)
    _emit(args, f, lambda f: f"{f.id}  {f.filename}  {f.bytes} bytes  sha256 {f.sha256}")
    return 0


def files_list(args: argparse.Namespace, c: Client) -> int:
    header = ["ID", "FILENAME", "BYTES", "STATUS"]
    _emit_table(args, c.files.list(), header, lambda f: [f.id, f.filename, str(f.bytes), f.status])
    return 0


files_get = show_command(lambda c, ref: c.files.get(ref))


files_delete = done_command(lambda c, ref: c.files.delete(ref))


# --- jobs -------------------------------------------------------------------------------------------
def _pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE arguments as a dict; a value that parses as JSON is taken as JSON."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r}: use key=value")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    hp = _pairs(args.hp, "--hp")
    if args.epochs is not None:
        hp["epochs"] = args.epochs
    return hp


def _layer(value: str | None) -> Any:
    if value is None:
        return None
    parts = [int(p) if p.lstrip("-").isdigit() else p for p in value.split(",")]
    return parts[0] if len(parts) == 1 else parts


def jobs_create(args: argparse.Namespace, c: Client) -> int:
    job = c.jobs.create(
        backbone=args.backbone,
        dataset=args.dataset,
        prompt_layer=_layer(args.layer),
        method=args.method,
        method_options=_pairs(args.option, "--option") or None,
        hyperparameters=_hyperparameters(args),
        name=args.name,
        prompt_id=args.prompt_id,
        idempotency_key=args.idempotency_key,
    )
    if args.watch:
        return _watch(args, c, job.id)
    _emit(args, job, lambda j: f"{j.id}  {j.status}")
    return 0


def _job_line(j: Any) -> list[str]:
    return [j.id, j.status, j.backbone, j.prompt or "-", f"{j.progress.epoch}/{j.progress.epochs}"]


def jobs_list(args: argparse.Namespace, c: Client) -> int:
    header = ["ID", "STATUS", "BACKBONE", "PROMPT", "EPOCH"]
    _emit_table(args, c.jobs.list(status=args.status), header, _job_line)
    return 0


jobs_get = show_command(lambda c, ref: c.jobs.get(ref))


def jobs_cancel(args: argparse.Namespace, c: Client) -> int:
    _emit(args, c.jobs.cancel(args.id), lambda j: f"{j.id}  {j.status}")
    return 0


def jobs_watch(args: argparse.Namespace, c: Client) -> int:
    return _watch(args, c, args.id)


def _watch(args: argparse.Namespace, c: Client, job_id: str) -> int:
    """Events until the job ends: a progress bar and one line per epoch (JSON lines with --json)."""
    from tqdm import tqdm

    bar = None if args.json else tqdm(total=100, unit="%", desc=job_id, leave=True, file=sys.stderr)
    try:
        for event in c.jobs.watch(job_id):
            if args.json:
                print(json.dumps(event.model_dump(mode="json")), flush=True)
                continue
            assert bar is not None
            data = event.data or {}
            if (event.type == "progress" and "fraction" in data) or event.type == "end":
                done = event.type == "end" and data.get("status") == JobStatus.SUCCEEDED
                bar.n = 100 if done else round(100 * float(data.get("fraction", bar.n / 100)))
                bar.refresh()
            elif event.type == "epoch" or event.level != "info" or event.type in ("state", "validation"):
                # lines on stdout, the bar on stderr: `watch ... > log` keeps a clean record
                bar.write(
                    event.message if event.type == "epoch" else f"[{event.type}] {event.message}",
                    file=sys.stdout,
                )
    finally:
        if bar is not None:
            bar.close()
    job = c.jobs.get(job_id)
    if not args.json:
        print(
            f"{job.id}  {job.status}"
            + (f"  prompt {job.prompt}" if job.prompt else "")
            + (f"  error {job.error.get('message')}" if job.error else "")
        )
    return 0 if job.status == JobStatus.SUCCEEDED else 2


# --- prompts ----------------------------------------------------------------------------------------
def prompts_list(args: argparse.Namespace, c: Client) -> int:
    header = ["PROMPT", "BACKBONE", "METHOD", "CLASSES", "NAME"]
    _emit_table(
        args,
        c.prompts.list(),
        header,
        lambda p: [p.ref, p.backbone, p.method, str(len(p.classes)), p.name or ""],
    )
    return 0


prompts_get = show_command(lambda c, ref: c.prompts.get(ref))


def prompts_import_adapter(args: argparse.Namespace, c: Client) -> int:
    classes = [n.strip() for n in args.classes.split(",")] if args.classes else None
    p = c.prompts.import_adapter(
        args.path, backbone=args.backbone, classes=classes, name=args.name, prompt_id=args.prompt_id
    )
    _emit(args, p, lambda x: f"{x.ref}  {x.method}  {len(x.classes)} classes")
    return 0


def prompts_download(args: argparse.Namespace, c: Client) -> int:
    path = c.prompts.download(args.id, args.path, format=args.format)
    _emit(
        args,
        {"id": args.id, "path": str(path), "bytes": path.stat().st_size},
        lambda d: f"wrote {d['path']} ({d['bytes']} bytes)",
    )
    return 0


prompts_delete = done_command(lambda c, ref: c.prompts.delete(ref))


# --- evaluations ------------------------------------------------------------------------------------
def _evaluation_text(ev: Any) -> str:
    line = f"{ev.id}  {ev.status}  {ev.prompt}"
    if ev.metrics:
        m = ev.metrics
        line += f"  top1 {m['top1']:.4f}  top5 {m['top5']:.4f}  ({m['num_images']} images)"
    if ev.error:
        line += f"  error {ev.error.get('code')}: {ev.error.get('message')}"
    return line


def evaluations_create(args: argparse.Namespace, c: Client) -> int:
    ev = c.evaluations.create(prompt=args.prompt, dataset=args.dataset)
    if args.wait:
        ev = c.evaluations.wait(ev.id)
    _emit(args, ev, _evaluation_text)
    return 0 if ev.status != EvaluationStatus.FAILED else 2


def evaluations_get(args: argparse.Namespace, c: Client) -> int:
    _emit(args, c.evaluations.get(args.id), _evaluation_text)
    return 0


def evaluations_list(args: argparse.Namespace, c: Client) -> int:
    items = list(c.evaluations.list())
    _emit(args, items, lambda xs: "\n".join(_evaluation_text(e) for e in xs))
    return 0


# --- predict (remote) -------------------------------------------------------------------------------
def predict_remote(args: argparse.Namespace, c: Client) -> int:
    images = list(args.paths)
    rows = c.predict(prompt=args.prompt, images=images, top_k=args.top_k)
    out = [
        {"image": str(i), "predictions": [p.model_dump() for p in row]}
        for i, row in zip(images, rows, strict=True)
    ]
    _emit(
        args,
        out,
        lambda xs: "\n".join(
            f"{x['image']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in x["predictions"])
            for x in xs
        ),
    )
    return 0


Actions: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def command_adders(
    subparsers: Actions, prefix: str = "", before: Callable[[argparse.Namespace], None] | None = None
) -> tuple[Callable[[str, str], Actions], Callable[[Actions, str, Command, str], argparse.ArgumentParser]]:
    """`group(name, help)` and `command(group, name, func, help)` for a tree of remote commands; `before`
    adjusts the parsed arguments of each (e.g. which key to use) before the client is built."""
    common = remote_options()

    def group(name: str, help: str) -> Actions:
        p = subparsers.add_parser(name, help=help)
        return p.add_subparsers(dest=f"{prefix}{name}_command", metavar="ACTION", required=True)

    def command(parent: Actions, name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, parents=[common])
        run = run_remote(func)

        def prepared(args: argparse.Namespace) -> int:
            if before is not None:
                before(args)
            return run(args)

        p.set_defaults(func=prepared)
        return p

    return group, command


def add_commands(subparsers: Actions) -> None:
    group, command = command_adders(subparsers)

    g = group("files", "upload and manage dataset files on a server")
    command(g, "upload", files_upload, "upload a dataset archive").add_argument("path")
    command(g, "list", files_list, "list uploaded files")
    command(g, "get", files_get, "show one file").add_argument("id")
    command(g, "delete", files_delete, "delete a file (refused while a job uses it)").add_argument("id")

    g = group("jobs", "train prompts on a server")
    p = command(g, "create", jobs_create, "submit a training job")
    p.add_argument("--backbone", required=True)
    p.add_argument("--dataset", required=True, help="file_... id or a URI")
    p.add_argument("--layer", default=None, help="index, name, comma list, 'all' or 'auto'")
    p.add_argument("--method", default=None, help="a servable method, or 'auto' (chosen on validation)")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="a method option, e.g. lora_rank=8, or for auto prefer=cost, max_train_seconds=600 (repeatable)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", help="a hyperparameter (repeatable)")
    p.add_argument("--name", default=None)
    p.add_argument("--prompt-id", default=None, help="store the result as a new version of this prompt")
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--watch", action="store_true", help="then follow it like `jobs watch`")
    command(g, "list", jobs_list, "list jobs (every page)").add_argument("--status", default=None)
    command(g, "get", jobs_get, "show one job").add_argument("id")
    command(g, "watch", jobs_watch, "follow a job: progress bar and per-epoch metrics").add_argument("id")
    command(g, "cancel", jobs_cancel, "cancel a job").add_argument("id")

    g = group("prompts", "trained prompts on a server")
    command(g, "list", prompts_list, "list prompts")
    command(g, "get", prompts_get, "show a prompt (`id` or `id@version`)").add_argument("id")
    p = command(g, "download", prompts_download, "download the artifact (safetensors) or a PEFT adapter")
    p.add_argument("id")
    p.add_argument("path")
    p.add_argument(
        "--format",
        choices=("artifact", "peft"),
        default="artifact",
        help="peft: a LoRA prompt as a zipped PEFT adapter folder (PeftModel.from_pretrained reads it)",
    )
    p = command(g, "import-adapter", prompts_import_adapter, "import a PEFT LoRA adapter as a prompt")
    p.add_argument("path", help="a zip of the adapter folder, or the folder (adapter_config.json + weights)")
    p.add_argument("--backbone", required=True, help="the registered backbone it was trained on")
    p.add_argument("--classes", default=None, help="class names in label order, comma-separated")
    p.add_argument("--name", default=None)
    p.add_argument("--prompt-id", default=None, help="import as a new version of this prompt")
    command(g, "delete", prompts_delete, "delete a prompt or one version").add_argument("id")

    g = group("evaluations", "score a prompt on a labelled dataset")
    p = command(g, "create", evaluations_create, "start an evaluation")
    p.add_argument("--prompt", required=True)
    p.add_argument("--dataset", required=True, help="file_... id or a URI")
    p.add_argument("--wait", action="store_true", help="wait for the result")
    command(g, "get", evaluations_get, "show an evaluation").add_argument("id")
    command(g, "list", evaluations_list, "list evaluations")
