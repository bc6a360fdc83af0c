"""CSV and JSONL manifests: one row per image, ``path,label`` (optionally ``split``).

Paths are relative to the manifest's folder and must stay inside it: a manifest is user input, and
without that rule it could point the worker at any file on the machine. A missing or unreadable file
is listed in the report like an image that does not decode.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from service.engine.datasets.base import SPLIT_ALIASES, Collected
from service.engine.errors import DatasetError

_PATH_KEYS = ("path", "file", "filename", "image", "filepath")
_LABEL_KEYS = ("label", "class", "category", "target")


def _pick(row: dict[str, str], keys: tuple[str, ...]) -> str | None:
    lowered = {k.strip().lower(): v for k, v in row.items() if isinstance(k, str)}
    for key in keys:
        if key in lowered and lowered[key] is not None:
            return str(lowered[key]).strip()
    return None


def _rows_csv(path: Path) -> list[tuple[int, str, str, str | None]]:
    text = path.read_text(encoding="utf-8-sig")
    reader = list(csv.reader(text.splitlines()))
    reader = [r for r in reader if any(c.strip() for c in r)]
    if not reader:
        raise DatasetError(f"manifest {path.name} is empty")
    header = [c.strip().lower() for c in reader[0]]
    rows: list[tuple[int, str, str, str | None]] = []
    if any(k in header for k in _PATH_KEYS) and any(k in header for k in _LABEL_KEYS):
        for lineno, raw in enumerate(reader[1:], start=2):
            record = dict(zip(header, raw, strict=False))
            p, label = _pick(record, _PATH_KEYS), _pick(record, _LABEL_KEYS)
            if not p or label is None or label == "":
                raise DatasetError(f"manifest {path.name} line {lineno}: needs a path and a label")
            rows.append((lineno, p, label, record.get("split")))
        return rows
    for lineno, raw in enumerate(reader, start=1):  # no header: path,label[,split]
        if len(raw) < 2 or not raw[0].strip() or not raw[1].strip():
            raise DatasetError(f"manifest {path.name} line {lineno}: expected 'path,label'")
        rows.append((lineno, raw[0].strip(), raw[1].strip(), raw[2].strip() if len(raw) > 2 else None))
    return rows


def _rows_jsonl(path: Path) -> list[tuple[int, str, str, str | None]]:
    rows: list[tuple[int, str, str, str | None]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"manifest {path.name} line {lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DatasetError(f"manifest {path.name} line {lineno}: expected an object")
        p = _pick({str(k): str(v) for k, v in record.items() if v is not None}, _PATH_KEYS)
        label = _pick({str(k): str(v) for k, v in record.items() if v is not None}, _LABEL_KEYS)
        if not p or label is None or label == "":
            raise DatasetError(f"manifest {path.name} line {lineno}: needs 'path' and 'label'")
        split = record.get("split")
        rows.append((lineno, p, label, str(split) if split is not None else None))
    if not rows:
        raise DatasetError(f"manifest {path.name} is empty")
    return rows


def load_manifest(path: Path, *, max_bytes: int) -> Collected:
    """Read a ``.csv`` or ``.jsonl`` manifest and decode the images it lists."""
    rows = _rows_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _rows_csv(path)
    base = path.resolve().parent
    out = Collected()
    total = 0
    for lineno, rel, label, split_raw in rows:
        split = SPLIT_ALIASES.get((split_raw or "train").strip().lower())
        if split is None:
            raise DatasetError(f"manifest {path.name} line {lineno}: unknown split {split_raw!r}")
        target = (base / rel).resolve()
        if not target.is_relative_to(base):
            raise DatasetError(
                f"manifest {path.name} line {lineno}: {rel!r} lies outside the manifest's folder"
            )
        try:
            data = target.read_bytes()
        except OSError:
            out.add_undecodable(rel)
            continue
        total += len(data)
        if total > max_bytes:
            raise DatasetError(f"the dataset holds more than {max_bytes} bytes of images")
        out.add_bytes(split, label, rel, data)
    return out
