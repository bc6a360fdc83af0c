"""Where every published number comes from: the commit, the command, the machine, and when.

Every results JSON carries ``provenance`` ``{commit, dirty, command, started, finished, machine, torch,
timm}``. Rows computed by a run are cached under ``<out>/.rows/<code>/`` keyed by the code identity
(the commit, plus a hash of the uncommitted diff when the tree is dirty) and the row's config, so a cut
``make bench`` resumes at the same commit and never reuses a row computed by other code.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO_ROOT, machine_info, read_json, write_json

#: Paths whose changes do not change what the benchmarks measure (their own outputs).
_IGNORED = ("bench/results",)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def code_identity() -> tuple[str, bool, str]:
    """(commit, dirty, code key): the key is the commit, plus a hash of the diff when dirty."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    excludes = [f":(exclude){p}" for p in _IGNORED]
    diff = _git("diff", "HEAD", "--", ".", *excludes)
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", ".", *excludes)
    dirty = bool(diff or untracked)
    if not dirty:
        return commit, False, commit[:12]
    digest = hashlib.sha256((diff + "\n" + untracked).encode()).hexdigest()[:8]
    return commit, True, f"{commit[:12]}-dirty-{digest}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def provenance(
    started: str, *, identity: tuple[str, bool, str] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The provenance block of a results file written now (`identity`: the code the run started with)."""
    import timm

    commit, dirty, _ = identity or code_identity()
    info = machine_info()
    return {
        "commit": commit,
        "dirty": dirty,
        "command": " ".join(shlex.quote(a) for a in sys.argv) or "python",
        "started": started,
        "finished": now(),
        "machine": {k: info.get(k) for k in ("platform", "cpu_model", "cpu_count", "device_name")},
        "torch": torch.__version__,
        "timm": timm.__version__,
        **(extra or {}),
    }


def row_code(config: dict[str, Any]) -> str:
    """A stable short hash of a row's config (what makes two runs the same run)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MixedCommits(RuntimeError):
    """A partial rerun would put rows of two code versions in one file."""


class RowCache:
    """Per-row JSON files under ``<out>/.rows/<code key>/``: safe for parallel workers, resumable."""

    def __init__(self, out_dir: Path, identity: tuple[str, bool, str] | None = None) -> None:
        # Workers get the parent's identity: the code a run started with, even if the tree changes.
        self.identity = identity or code_identity()
        self.commit, self.dirty, self.code = self.identity
        self.dir = out_dir / ".rows" / self.code

    def path(self, config: dict[str, Any]) -> Path:
        return self.dir / f"{row_code(config)}.json"

    def get(self, config: dict[str, Any]) -> dict[str, Any] | None:
        row = read_json(self.path(config))
        return row if isinstance(row, dict) else None

    def put(self, config: dict[str, Any], row: dict[str, Any]) -> None:
        write_json(self.path(config), row)


def check_merge(path: Path, only: bool, allow_mixed: bool) -> dict[str, Any] | None:
    """The existing results file a partial (``--only``) run merges into, after the commit check.

    A whole run returns None (it rewrites the file). A partial run at another commit is refused unless
    ``allow_mixed``: then each row keeps its own provenance and the file lists every commit.
    """
    if not only:
        return None
    old = read_json(path)
    if not isinstance(old, dict):
        return None
    theirs = (old.get("provenance") or {}).get("commit")
    mine = code_identity()[0]
    if theirs and theirs != mine and not allow_mixed:
        raise MixedCommits(
            f"{path.name} was measured at commit {theirs[:12]}, this is {mine[:12]}: run the whole "
            "`make bench` (a code change means a new run), or pass --allow-mixed-commits"
        )
    return old
