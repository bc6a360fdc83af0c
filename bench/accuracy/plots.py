"""Plots of the accuracy payload."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_sweeps(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per backbone: AP accuracy per layer, validation and test curves, one panel per dataset."""
    import matplotlib.pyplot as plt

    by_bb: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in payload.get("sweep", []):
        by_bb.setdefault(r["backbone"], {}).setdefault(r["dataset"], []).append(r)
    paths = []
    for bb, per_ds in by_bb.items():
        fig, axes = plt.subplots(1, len(per_ds), figsize=(4.5 * len(per_ds), 3.4), squeeze=False)
        for ax, (ds, rows) in zip(axes[0], per_ds.items(), strict=True):
            rows = sorted(rows, key=lambda r: r["prompt_layer"])
            xs = [r["prompt_layer"] for r in rows]
            ax.plot(xs, [100 * r["val_accuracy"] for r in rows], "o-", label="validation")
            ax.plot(xs, [100 * r["test_accuracy"] for r in rows], "s--", label="test")
            chosen = [r["prompt_layer"] for r in rows if r.get("chosen")]
            for c in chosen:
                ax.axvline(c, color="grey", lw=0.8, ls=":", label="chosen on validation")
            ax.set_title(f"{bb} / {ds}")
            ax.set_xlabel("prompt layer")
            ax.set_ylabel("accuracy %")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"sweep_{bb}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
