"""Whether a process of this host still runs: the engine watching its supervisor, and an embedded worker
deciding whether a lease's owner is gone."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive"]


def pid_alive(pid: int) -> bool:
    """True while `pid` runs. A killed process stays a zombie until its parent reaps it: that is dead too.
    Without /proc, the kernel says whether the pid exists at all (another user's process counts as alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
