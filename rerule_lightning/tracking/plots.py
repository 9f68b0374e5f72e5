"""PNG plots of ``rerule report``: metric curves against step (mean ± std band per row) and a Pareto scatter.

Every plot is written even when no run logged its metric (it then says so), so a report always has the same
files. Curves of a row average its units' curves at each step where at least one unit logged a value, with a
± sample-std band when the plot has at most ``MAX_BANDS`` rows.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rerule_lightning.tracking.report_rows import Row

# (file, title, y label, [(metric, line style)], fallback [(metric, line style)] used when the primary
# metrics have no curve with >= 2 points)
CURVE_PLOTS: list[tuple[str, str, str, list[tuple[str, str]], list[tuple[str, str]]]] = [
    ("reward_vs_step.png", "Mean training reward", "train/reward", [("train/reward", "-")], []),
    ("forget_refusal_vs_step.png", "Forget refusal", "forget/refusal_rate", [("forget/refusal_rate", "-")],
     [("train/reward_forget", "-")]),
    ("boundary_accuracy_vs_step.png", "Boundary accuracy (solid: same-family, dashed: unrelated)",
     "answer accuracy", [("boundary_hard/answer_accuracy", "-"), ("boundary_easy/answer_accuracy", "--")],
     [("train/reward_boundary", "-")]),
    ("replay_buffer_vs_step.png", "Replay buffer size", "replay/buffer_size", [("replay/buffer_size", "-")], []),
    ("is_weights_vs_step.png", "Importance weights (solid: mean, dashed: max)", "IS weight",
     [("replay/is_weight_mean", "-"), ("replay/is_weight_max", "--")], []),
]
PARETO_PNG = "forget_vs_retain_pareto.png"
MAX_BANDS = 5  # ± std bands only up to this many rows (more would hide the lines)
LOG_Y = {"is_weights_vs_step.png"}  # uncorrected IS ratios span orders of magnitude


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and sample std (0 where one value) over several ``(step, value)`` curves."""
    at: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            if math.isfinite(v):
                at.setdefault(s, []).append(v)
    steps = sorted(at)
    return (steps, [statistics.fmean(at[s]) for s in steps],
            [statistics.stdev(at[s]) if len(at[s]) > 1 else 0.0 for s in steps])


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_curve(rows: list[Row], metrics: list[tuple[str, str]]) -> bool:
    return any(len(u.curves.get(m, [])) >= 2 for r in rows for u in r.units for m, _ in metrics)


def plot_curves(rows: list[Row], path: str, title: str, ylabel: str, metrics: list[tuple[str, str]],
                fallback: list[tuple[str, str]]) -> str:
    """One line per row and metric (mean over the row's units, ± std band); returns ``path``."""
    plt = _plt()
    if not _has_curve(rows, metrics) and fallback and _has_curve(rows, fallback):
        metrics, ylabel = fallback, f"{fallback[0][0]} (training rollouts)"
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    drawn = 0
    for i, row in enumerate(rows):
        for m, style in metrics:
            steps, mean, std = mean_curve([u.curves[m] for u in row.units if m in u.curves])
            if not steps:
                continue
            c = colours(i % colours.N)
            ax.plot(steps, mean, style, color=c, marker="o" if len(steps) < 8 else None, markersize=3,
                    label=row.label if style == "-" or len(metrics) == 1 else None)
            if any(std) and len(rows) <= MAX_BANDS:
                ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                color=c, alpha=0.15, linewidth=0)
            drawn += 1
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no run logged " + ", ".join(m for m, _ in metrics), ha="center", va="center",
                transform=ax.transAxes)
    if drawn and os.path.basename(path) in LOG_Y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(rows: list[Row], on_front: list[bool], path: str, pareto_x: str, pareto_y: str) -> str:
    """Forget-vs-retain scatter: small dots per unit, large markers per row, the front joined and ringed."""
    from rerule_lightning.tracking.report_rows import axis_value

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    front_pts = []
    for i, (row, front) in enumerate(zip(rows, on_front)):
        c = colours(i % colours.N)
        ux = [axis_value(u.final, pareto_x) for u in row.units]
        uy = [axis_value(u.final, pareto_y) for u in row.units]
        if len(row.units) > 1:
            ax.scatter(ux, uy, s=12, color=c, alpha=0.45)
        x, y = axis_value(row.stats, pareto_x), axis_value(row.stats, pareto_y)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        ax.scatter([x], [y], s=70, color=c, edgecolor="black" if front else "none", linewidth=1.5,
                   label=row.label + (" (front)" if front else ""), zorder=3)
        if front:
            front_pts.append((x, y))
    if front_pts:
        xs, ys = zip(*sorted(front_pts))
        ax.step(xs, ys, where="pre", color="black", linestyle=":", linewidth=1, label="Pareto front")
    else:
        ax.text(0.5, 0.5, f"no run logged {pareto_x} and {pareto_y}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(f"{pareto_x} (higher = more forgetting)")
    ax.set_ylabel(f"{pareto_y} (higher = better kept)")
    ax.set_title("Forget vs retain (both maximised)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(rows: list[Row], on_front: list[bool], output_dir: str, pareto_x: str, pareto_y: str) -> list[str]:
    """Every curve plot and the Pareto scatter; returns their paths."""
    paths = [plot_curves(rows, os.path.join(output_dir, f), t, y, ms, fb) for f, t, y, ms, fb in CURVE_PLOTS]
    paths.append(plot_pareto(rows, on_front, os.path.join(output_dir, PARETO_PNG), pareto_x, pareto_y))
    return paths
