"""Tables and plots of ``benchmarks/frontier.py`` from its ``results.json`` (pure reading, no training).

* :func:`chosen_points`: per method, seed and constraint the point chosen on the selection half
  (:func:`rerule_lightning.tracking.frontier.choose` over every point of every run of that method and seed);
* ``table.md``: per method and constraint, the seeds that reached it, the report-half same-family, unrelated,
  retain and forget accuracy, forget refusal and the wrong / degenerate rates at the chosen points (mean over the
  seeds that reached it), their compute, and Δ same-family vs RULE on the same seed (95 % t-interval); then per
  method the area under the (forget refusal, same-family) frontier over refusal ∈ [0.8, 1] (selection half) with
  Δ vs RULE; re-runs whose validation did not repeat the recorded point are counted;
* ``points.csv``: every frontier point; ``frontier_refusal.png`` / ``frontier_accuracy.png``: per method the
  staircase frontier (best same-family reachable at forget refusal ≥ r, resp. forget accuracy ≤ a), mean and
  ± sample-std band over seeds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any

from benchmarks.records import merge_records
from rerule_lightning.tracking.frontier import (
    CONSTRAINTS,
    FORGET_ACC,
    REFUSAL,
    RETAIN,
    SAME_FAMILY,
    UNRELATED,
    best_at,
    choose,
    frontier_area,
    paired_vs_reference,
)

REFERENCE = "RULE"
#: Report-half columns at a chosen point: (header, metric key).
REPORT_COLUMNS = [("same-family", SAME_FAMILY), ("unrelated", UNRELATED), ("retain", RETAIN),
                  ("forget acc", FORGET_ACC), ("forget refusal", REFUSAL),
                  ("forget wrong", "forget/wrong_answer_rate"), ("forget degenerate", "forget/degenerate_rate")]


def _points(runs: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every point of every run, with its run's identity, grouped by (method, seed), in record order."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        for p in r["points"]:
            at = p["step"] if r["family"] == "rl" else p["epoch"]
            out.setdefault((r["method"], int(r["seed"])), []).append(
                {**p, "key": r["key"], "method": r["method"], "seed": int(r["seed"]), "knobs": r["knobs"], "at": at})
    return out


def chosen_points(runs: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """``{(run key, seed, step or epoch): point}`` of every point chosen under some constraint (each once)."""
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for pts in _points(runs).values():
        for c in CONSTRAINTS:
            p = choose(pts, c)
            if p is not None:
                out.setdefault((p["key"], p["seed"], p["at"]), p)
    return out


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _mean(vals: list[float]) -> float:
    xs = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.fmean(xs) if xs else math.nan


def _delta(method: dict[int, float | None], ref: dict[int, float | None]) -> str:
    pf = paired_vs_reference(method, ref)
    if pf.stat is None:
        return "no paired seed"
    s = pf.stat
    text = f"{s.mean:+.3f}" + (f" [{s.low:+.3f}, {s.high:+.3f}]" if s.n > 1 else "") + f" (n={s.n})"
    if pf.reference_missing:
        text += f"; RULE not reached on seeds {pf.reference_missing}"
    return text


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: per constraint the chosen point per seed (with its report record), and the area per seed."""
    runs = [r for r in results["runs"] if r.get("kind") == "run"]
    reports = {(r["key"], int(r["seed"]), int(r["at"])): r for r in results["runs"] if r.get("kind") == "report"}
    by = _points(runs)
    seeds = sorted({s for _, s in by})
    methods = list(dict.fromkeys(m for m, _ in by))
    out: dict[str, Any] = {"seeds": seeds, "methods": {}}
    for m in methods:
        entry: dict[str, Any] = {"constraints": {}, "area": {}}
        for c in CONSTRAINTS:
            per_seed: dict[int, dict[str, Any] | None] = {}
            for s in seeds:
                p = choose(by.get((m, s), []), c)
                per_seed[s] = None if p is None else {"point": p, "report": reports.get((p["key"], s, p["at"]))}
            entry["constraints"][c.name] = per_seed
        entry["area"] = {s: frontier_area(by[(m, s)]) if (m, s) in by else None for s in seeds}
        out["methods"][m] = entry
    return out


def _report_value(cell: dict[str, Any] | None, key: str) -> float | None:
    if cell is None or cell["report"] is None:
        return None
    v = cell["report"]["report"].get(key)
    return None if v is None else float(v)


def render_table(summary: dict[str, Any]) -> str:
    """The markdown table of :func:`summarise`."""
    seeds, methods = summary["seeds"], summary["methods"]
    lines = [f"Seeds: {seeds}. Points chosen on the selection half (retain accuracy ≥ 0.90 always required); "
             "accuracies and output classes on the report half of the same checkpoint (mean over the seeds that "
             "reached the constraint). Δ: same-family vs RULE on the same seed, 95 % t-interval.", ""]
    head = ["method", "constraint", "reached", *[h for h, _ in REPORT_COLUMNS], "sequences", "train s",
            "Δ same-family vs RULE", "re-run ≠"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = methods.get(REFERENCE)
    for m, entry in methods.items():
        for c in CONSTRAINTS:
            cells = entry["constraints"][c.name]
            reached = [s for s, v in cells.items() if v is not None]
            vals = [_fmt(_mean([_report_value(cells[s], k) for s in reached])) for _, k in REPORT_COLUMNS]
            seq = _mean([cells[s]["point"]["sequences"] for s in reached])
            secs = _mean([cells[s]["point"]["train_s"] for s in reached])
            unverified = sum(1 for s in reached if cells[s]["report"] is not None and not cells[s]["report"]["verified"])
            missing = sum(1 for s in reached if cells[s]["report"] is None)
            if ref is None or m == REFERENCE:
                delta = "(reference)" if m == REFERENCE else "no RULE run"
            else:
                mine = {s: _report_value(cells[s], SAME_FAMILY) for s in seeds}
                theirs = {s: _report_value(ref["constraints"][c.name][s], SAME_FAMILY) for s in seeds}
                delta = _delta(mine, theirs)
            not_reached = [s for s in seeds if cells[s] is None]
            reach = f"{len(reached)}/{len(seeds)}" + (f" (not: {not_reached})" if not_reached else "")
            lines.append("| " + " | ".join([m, c.name, reach, *vals, _fmt(seq, 0), _fmt(secs, 1), delta,
                                              f"{unverified}" + (f" (+{missing} not evaluated)" if missing else "")])
                         + " |")
    lines += ["", "Area under the (forget refusal, same-family) frontier over refusal ∈ [0.8, 1], divided by 0.2 "
              "(selection half; the best same-family reachable at refusal ≥ r, averaged over r):", "",
              "| method | area (mean ± sd over seeds) | Δ area vs RULE |", "|---|---|---|"]
    for m, entry in methods.items():
        vals = [v for v in entry["area"].values() if v is not None]
        sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
        delta = "(reference)" if m == REFERENCE else (_delta(entry["area"], ref["area"]) if ref else "no RULE run")
        lines.append(f"| {m} | {_fmt(_mean(vals))} ± {_fmt(sd)} | {delta} |")
    return "\n".join(lines) + "\n"


def staircase(points: list[dict[str, Any]], grid: list[float], x: str, higher: bool) -> list[float]:
    """The frontier's staircase (best selection-half same-family) at each grid value of ``x``."""
    return [best_at(points, r, x=x, x_higher_is_better=higher) for r in grid]


def plot_frontiers(summary_points: dict[tuple[str, int], list[dict[str, Any]]], path: str, x: str,
                   higher: bool) -> str:
    """One line (mean over seeds) and ± std band per method; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = (0.5, 1.0) if higher else (0.0, 0.5)
    grid = [lo + (hi - lo) * i / 100 for i in range(101)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = list(dict.fromkeys(m for m, _ in summary_points))
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    for i, m in enumerate(methods):
        curves = [staircase(pts, grid, x, higher) for (mm, _), pts in summary_points.items() if mm == m]
        mean = [statistics.fmean(v) for v in zip(*curves)]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*curves)]
        c = colours(i % colours.N)
        ax.step(grid, mean, where="post", color=c, label=f"{m} ({len(curves)} seeds)")
        ax.fill_between(grid, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        step="post", color=c, alpha=0.15, linewidth=0)
    ax.set_xlabel(f"{x} ({'at least' if higher else 'at most'}; selection half)")
    ax.set_ylabel("best same-family accuracy (retain ≥ 0.90)")
    ax.set_title("Frontier at matched forgetting (mean ± std over seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _unit(r: dict[str, Any]) -> str | None:
    if r.get("kind") in ("run", "report"):
        return f"{r['kind']} {r['key']!r} seed {r['seed']}" + (f" at {r['at']}" if r.get("kind") == "report" else "")
    if r.get("stage") == "rejection steering":
        return f"rejection steering seed {r['seed']}"
    return None


def merge_results(inputs: list[str], output_dir: str) -> str:
    """Write ``<output_dir>/results.json`` holding every record of the ``results.json`` of each input directory
    (e.g. the RL methods and the baselines run as two processes, each with its own ``--output_dir``); returns
    its path.

    Raises:
        SystemExit: An input has no ``results.json``, or two inputs hold the same unit of work (a run, a report
            of a run at a step, a seed's rejection steering; the message names both files and the unit).
    """
    return merge_records(inputs, output_dir, _unit, "benchmarks/frontier.py")


def write_outputs(output_dir: str) -> list[str]:
    """``table.md``, ``points.csv`` and the two frontier PNGs from ``<output_dir>/results.json``."""
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    runs = [r for r in results["runs"] if r.get("kind") == "run"]
    summary = summarise(results)
    paths = [os.path.join(output_dir, n) for n in ("table.md", "points.csv", "frontier_refusal.png",
                                                    "frontier_accuracy.png")]
    with open(paths[0], "w") as f:
        f.write(render_table(summary))
    pts = _points(runs)
    metric_keys = sorted({k for ps in pts.values() for p in ps for k in p["select"]})
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "run", "at", "step", "epoch", "sequences", "train_s", *metric_keys])
        for ps in pts.values():
            for p in ps:
                w.writerow([p["method"], p["seed"], p["key"], p["at"], p["step"], p["epoch"], p["sequences"],
                            f"{p['train_s']:.3f}", *[p["select"].get(k, "") for k in metric_keys]])
    plot_frontiers(pts, paths[2], REFUSAL, True)
    plot_frontiers(pts, paths[3], FORGET_ACC, False)
    return paths
