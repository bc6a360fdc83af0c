"""Which runs a plan needs, given the rows already cached (the test split never chooses anything).

Per scope: each variant's learning rate on validation (a log grid, extended while the best sits at an
edge); AP's layer swept at its tuned rate and chosen on validation; a borrowing scope reruns an earlier
scope's choices at its own budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.accuracy.plans import LADDER, Plan, Scope
from bench.accuracy.runs import run_config
from bench.provenance import RowCache


def _ladder_index(lr: float) -> int:
    return min(range(len(LADDER)), key=lambda i: abs(np.log(LADDER[i]) - np.log(lr)))


def initial_grid(centre: float, points: int) -> list[float]:
    c = _ladder_index(centre)
    idx = {1: [c], 2: [c, c + 1]}.get(points, [c - 1, c, c + 1])
    return [LADDER[i] for i in idx if 0 <= i < len(LADDER)]


@dataclass
class Need:
    """A run the protocol needs now (not yet cached), with its priority (lower = sooner)."""

    priority: tuple[int, ...]
    scope: Scope
    config: dict[str, Any]


class Protocol:
    """Walks a plan against the row cache: yields missing runs, or the finished selection when done."""

    def __init__(self, plan: Plan, cache: RowCache, catalogs: dict[str, dict[str, Any]]) -> None:
        self.plan, self.cache, self.catalogs = plan, cache, catalogs

    def _row(self, scope: Scope, variant: str, lr: float, seed: int, layer: int | None) -> tuple[Any, Any]:
        cfg = run_config(scope, variant, lr=lr, seed=seed, layer=layer)
        return cfg, self.cache.get(cfg)

    def tune(
        self, scope: Scope, variant: str, layer: int | None, prio: tuple[int, ...], needs: list[Need]
    ) -> tuple[float, list[float], list[dict[str, Any]]] | None:
        """(chosen lr, grid, grid rows) once the grid has settled, else None (and the runs it needs)."""
        grid = initial_grid(scope.centre(variant), scope.grid_points)
        for _ in range(scope.max_extensions + 1):
            rows = []
            for lr in grid:
                cfg, row = self._row(scope, variant, lr, 0, layer)
                if row is None:
                    needs.append(Need(prio, scope, cfg))
                rows.append(row)
            if any(r is None for r in rows):
                return None
            best = max(range(len(grid)), key=lambda i: rows[i]["val_accuracy"])
            if scope.grid_points == 1 or len(grid) >= scope.grid_points + scope.max_extensions:
                break
            i = _ladder_index(grid[best])
            if best == 0 and i > 0:
                grid = [LADDER[i - 1], *grid]
            elif best == len(grid) - 1 and i + 1 < len(LADDER):
                grid = [*grid, LADDER[i + 1]]
            else:
                break
        best_row = max(rows, key=lambda r: r["val_accuracy"])
        return float(best_row["lr"]), grid, rows

    def sweep_layers(self, scope: Scope) -> list[int]:
        cat = self.catalogs[scope.backbone]
        last, rec = len(cat["layers"]) - 1, cat["recommended_layer"]
        if scope.sweep_stride <= 1:
            return list(range(1, last + 1))
        return sorted({1, rec, last, *range(1, last + 1, scope.sweep_stride)})

    def walk(self) -> tuple[list[Need], dict[str, Any]]:
        """(runs needed now, selection so far: per scope and variant the lr, grid, layer and rows)."""
        needs: list[Need] = []
        selection: dict[str, Any] = {}
        for si, scope in enumerate(self.plan.scopes):
            if scope.settings_from is not None:
                self._walk_borrowed(si, scope, selection, needs)
                continue
            sel: dict[str, Any] = selection.setdefault(scope.name, {})
            rec = self.catalogs[scope.backbone]["recommended_layer"]
            for vi, variant in enumerate(scope.variants):
                prio = (si, 0, vi)
                layer: int | None = None
                grid_layer: int | None = None
                if variant in ("ap", "ap_channel"):
                    layer = self._ap_layer(scope, sel, rec, prio, needs)
                    if layer is None:
                        continue
                if variant == "ap":
                    lr, grid = sel["_ap_lr"]
                    grid_layer = rec  # AP's rate is tuned at the recommended layer, before the sweep
                    tuned: Any = (lr, grid, [])
                else:
                    grid_layer = layer
                    tuned = self.tune(scope, variant, layer, prio, needs)
                if tuned is None:
                    continue
                lr, grid, _ = tuned
                sel[variant] = {
                    "lr": lr,
                    "lr_grid": grid,
                    "layer": layer,
                    "grid_layer": grid_layer,
                    "rows": self._seed_rows(si, vi, scope, variant, lr, layer, needs),
                }
        return needs, selection

    def _seed_rows(
        self, si: int, vi: int, scope: Scope, variant: str, lr: float, layer: int | None, needs: list[Need]
    ) -> list[dict[str, Any]]:
        """Every seed's row at the chosen rate and layer; the missing ones become needs (after tuning's)."""
        rows = []
        for seed in scope.seeds:
            cfg, row = self._row(scope, variant, lr, seed, layer)
            if row is None:
                needs.append(Need((si, 1 + seed, vi), scope, cfg))
            else:
                rows.append(row)
        return rows

    def _walk_borrowed(self, si: int, scope: Scope, selection: dict[str, Any], needs: list[Need]) -> None:
        """A scope that reuses an earlier scope's validation choices: its runs wait for that choice."""
        earlier = [s.name for s in self.plan.scopes[:si] if s.backbone == scope.backbone]
        if scope.settings_from not in earlier:
            raise ValueError(f"{scope.name}: settings_from must name an earlier scope of {scope.backbone}")
        source = selection.get(scope.settings_from, {})
        sel: dict[str, Any] = selection.setdefault(scope.name, {})
        for vi, variant in enumerate(scope.variants):
            chosen = source.get(variant)
            if chosen is None:
                continue  # the source scope has not chosen this variant's rate (and layer) yet
            lr, layer = chosen["lr"], chosen["layer"]
            sel[variant] = {
                "lr": lr,
                "lr_grid": [lr],
                "layer": layer,
                "grid_layer": layer,
                "rows": self._seed_rows(si, vi, scope, variant, lr, layer, needs),
                "settings_from": scope.settings_from,
            }

    def _ap_layer(
        self, scope: Scope, sel: dict[str, Any], rec: int, prio: tuple[int, ...], needs: list[Need]
    ) -> int | None:
        """The val-best AP layer: lr tuned at the recommended layer, then a sweep at that lr."""
        if "ap" in sel.get("_ap_layer", {}):
            return int(sel["_ap_layer"]["ap"])
        tuned = self.tune(scope, "ap", rec, prio, needs)
        if tuned is None:
            return None
        lr, grid, _ = tuned
        sweep = []
        for layer in self.sweep_layers(scope):
            cfg, row = self._row(scope, "ap", lr, 0, layer)
            if row is None:
                needs.append(Need(prio, scope, cfg))
            sweep.append(row)
        if any(r is None for r in sweep):
            return None
        best = max(sweep, key=lambda r: r["val_accuracy"])
        sel["_ap_lr"] = (lr, grid)
        sel["_sweep"] = sweep
        sel["_ap_layer"] = {"ap": int(best["prompt_layer"])}
        return int(best["prompt_layer"])


# --- driving it -----------------------------------------------------------------------------------
