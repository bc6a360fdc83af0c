"""Plumbing every benchmark shares: paths, machine info, timing, memory, results files and plots."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: benchmarks run on servers and in CI

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Real weights and data beside the checkout (never committed); ACTPROMPT_SHARED_DIR overrides.
SHARED_DIR = Path(os.environ.get("ACTPROMPT_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
WEIGHTS_DIR = SHARED_DIR / "weights"
DATA_DIR = SHARED_DIR / "data"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Downstream datasets: every .npz in ../shared/data except the backbones' source task (CIFAR-10).
DATASETS: dict[str, str] = {
    "gtsrb": "gtsrb32.npz",
    "tinyimagenet": "tinyimagenet32.npz",
    "mnist": "mnist10k.npz",
}


#: Class subsets of a packed dataset: name -> (source dataset, how many of its first classes are kept).
#: Tiny-ImageNet's 200 classes at 3 training images each leave every method near chance; 20 of them
#: at 30 each let the methods separate at a budget the default plan affords.
SUBSETS: dict[str, tuple[str, int]] = {"tinyimagenet20": ("tinyimagenet", 20)}


def dataset_path(name: str) -> Path:
    """The .npz of benchmark dataset `name`; a class subset is written once to the temp folder
    (deterministic content, written atomically: parallel workers may ask at once)."""
    if name in DATASETS:
        return DATA_DIR / DATASETS[name]
    source, k = SUBSETS[name]
    out = Path(tempfile.gettempdir()) / "actprompt-bench" / f"{name}.npz"
    if not out.exists():
        d = dict(np.load(DATA_DIR / DATASETS[source]))
        splits = ("train", "test")
        keep = {f"{x}_{s}": d[f"{x}_{s}"][d[f"y_{s}"] < k] for s in splits for x in "xy"}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, classes=d["classes"][:k], **keep)
        os.replace(tmp, out)
    return out


def results_dir(quick: bool) -> Path:
    """Quick runs write beside, never over, the committed full results."""
    path = RESULTS_DIR / "quick" if quick else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_quick_out(argv: list[str] | None, description: str | None, quick_help: str) -> argparse.Namespace:
    """The options of a bench that takes only `--quick` and `--out` (default: `results_dir`)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.out = args.out or results_dir(args.quick)
    return args


def set_threads(default: int = 1) -> int:
    """One torch thread unless ACTPROMPT_BENCH_THREADS says otherwise.

    On the shared 2-core machine a 2-thread forward pass of ResNet-20 ran 2.5x slower than a 1-thread
    one (oversubscribed cores make every intra-op barrier wait), so one thread is the honest default.
    """
    n = int(os.environ.get("ACTPROMPT_BENCH_THREADS", default))
    torch.set_num_threads(n)
    return n


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    device = device or torch.device("cpu")
    info: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
    }
    with contextlib.suppress(OSError):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            models = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if models:
            info["cpu_model"] = models[0]
    except OSError:
        pass
    return info


def log(message: str) -> None:
    """Timestamped progress line on stderr (the full run is long; its log is how you follow it)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(
    fn: Callable[[], Any], *, warmup: int, iters: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of each timed call.

    On a shared CPU the wall clock measures the neighbours as much as the code; the process's CPU time
    (one torch thread) barely depends on them, so CPU-side ratios are taken from it.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), 0.0
    return float(statistics.mean(values)), float(statistics.stdev(values))


# --- memory -------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; ru_maxrss elsewhere, an upper bound)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the kernel (glibc `malloc_trim`), so
    that memory freed by an earlier run in the same process is not resident when the next one starts:
    otherwise that run reuses it, its resident size never grows and its peak reads 0 B."""
    import contextlib
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak stays a lower bound
            ctypes.CDLL(name).malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0), so a later peak is this phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Resident-set high-water mark of this process: VmHWM (resettable), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


@dataclass
class PeakMemory:
    """Peak memory of a code region above what was resident when it began.

    CPU: the process's resident high-water mark (reset at the start when the kernel allows, so earlier
    transients such as model construction do not hide the region's own peak), after freed heap pages
    went back to the kernel (so a reused worker process does not hide it either). CUDA: the allocator's
    peak.
    """

    device: torch.device
    baseline: int = 0
    peak: int = 0
    method: str = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            release_freed_memory()
            self.method = "VmHWM (reset via clear_refs)" if reset_peak_rss() else "ru_maxrss"
            self.baseline = current_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes()

    @property
    def used(self) -> int:
        """Bytes the region added at its peak."""
        return max(0, self.peak - self.baseline)


# --- results files ------------------------------------------------------------------------------


def write_json(path: Path, payload: Any) -> None:
    """Write atomically (a reader never sees half a file; an interrupted run keeps the last good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


def fmt_bytes(n: float | None) -> str:
    if n is None or n != n:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_params(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"
