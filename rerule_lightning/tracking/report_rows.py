"""The data model and statistics of ``rerule report``: runs, units (one trained model), rows (groups of
units, mean ± sample std) and the Pareto front. The rules are stated in :mod:`rerule_lightning.cli.report`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

UNIT_TAG = "rerule.unit"


@dataclass
class RunInfo:
    """What the report needs of one MLflow run."""

    run_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    start_ms: int
    end_ms: int | None
    final: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Unit:
    """One trained model: its merged final metrics, curves and wall-clock."""

    label: str
    runs: list[RunInfo]
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]]
    wall_clock_s: float

    def key_value(self, key: str) -> str:
        """A tag (first) or param value shared by the unit's runs, ``-`` when none has it."""
        for src in ("tags", "params"):
            for r in self.runs:
                if key in getattr(r, src):
                    return getattr(r, src)[key]
        return "-"


@dataclass
class Row:
    """One table row: a unit, or a group of units (mean ± sample std)."""

    label: str
    units: list[Unit]
    stats: dict[str, tuple[float, float | None]]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof = 1) of the finite values; ``(nan, None)`` when none, std ``None`` for one."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return float("nan"), None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def merge_unit(label: str, runs: list[RunInfo]) -> Unit:
    """Merge a unit's runs (see the module docstring for the rules)."""
    runs = sorted(runs, key=lambda r: (r.end_ms or r.start_ms, r.start_ms))
    final: dict[str, float] = {}
    for r in runs:  # later-ending runs override
        final.update(r.final)
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        for k, pts in r.history.items():
            if len(pts) > len(curves.get(k, [])):
                curves[k] = sorted(pts)
    fit = [r for r in runs if r.tags.get("rerule.stage") == "fit"]
    timed = [r for r in (fit or runs) if r.end_ms is not None]
    wall = sum((r.end_ms - r.start_ms) / 1000.0 for r in timed) if timed else float("nan")
    return Unit(label, runs, final, curves, wall)


def build_units(runs: list[RunInfo], merge_by: str = UNIT_TAG) -> list[Unit]:
    """Units in order of their first run's start time."""
    by_key: dict[str, list[RunInfo]] = {}
    for r in sorted(runs, key=lambda r: r.start_ms):
        key = r.tags.get(merge_by) or f"{r.name} ({r.run_id[:8]})"
        by_key.setdefault(key, []).append(r)
    return [merge_unit(k, rs) for k, rs in by_key.items()]


def build_rows(units: list[Unit], metrics: list[str], group_by: list[str] | None = None) -> list[Row]:
    """One row per unit, or per group of units with equal ``group_by`` values (first-seen order)."""
    groups: dict[str, list[Unit]] = {}
    for u in units:
        label = " / ".join(u.key_value(k) for k in group_by) if group_by else u.label
        groups.setdefault(label, []).append(u)
    rows = []
    for label, us in groups.items():
        stats = {m: mean_std([u.final.get(m, float("nan")) for u in us]) for m in metrics}
        stats["wall_clock_s"] = mean_std([u.wall_clock_s for u in us])
        rows.append(Row(label, us, stats))
    return rows


def axis_value(stats: dict[str, tuple[float, float | None]] | dict[str, float], spec: str) -> float:
    """Value of a Pareto axis ``metric`` or ``1-metric`` from row stats or a unit's final metrics."""
    key = spec[2:] if spec.startswith("1-") else spec
    v = stats.get(key, float("nan"))
    v = v[0] if isinstance(v, tuple) else v
    return 1.0 - v if spec.startswith("1-") else v


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points are non-dominated when both coordinates are maximised (NaN points never are)."""
    out = []
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            out.append(False)
            continue
        dominated = any(j != i and qx >= x and qy >= y and (qx > x or qy > y)
                        for j, (qx, qy) in enumerate(points) if math.isfinite(qx) and math.isfinite(qy))
        out.append(not dominated)
    return out


__all__ = ["UNIT_TAG", "Row", "RunInfo", "Unit", "axis_value", "build_rows", "build_units", "mean_std",
           "merge_unit", "pareto_front"]
