"""Tables, the disparity report and the curves of the paired replay benchmark (``benchmarks/replay.py``).

Pure functions of the ``results.json`` records (one per run: ``stage``, ``seed``, ``preset``, ``final``,
``by_group``, ``curves``, ``train_s``), so they are tested on hand-built records.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rerule_lightning.tracking.paired import (  # noqa: E402
    mean_over,
    paired_differences,
    paired_ratios,
    steps_to_reach,
    t_interval,
)

BASELINE = "RULE"
RS = "rejection steering"
#: (metric key, column title) of the final evaluation, all splits, every paraphrase.
FINAL = [("forget/refusal_rate", "forget refusal"), ("boundary_hard/answer_accuracy", "same-family acc"),
         ("boundary_easy/answer_accuracy", "unrelated acc"), ("retain/answer_accuracy", "retain acc"),
         ("boundary_hard/refusal_rate", "same-family refusal")]
#: Metrics whose paired difference against RULE the table shows.
PAIRED = ["boundary_hard/answer_accuracy", "forget/refusal_rate", "retain/answer_accuracy",
          "boundary_easy/answer_accuracy"]
HEADLINE_CURVE = "boundary_hard/answer_accuracy"

#: The `hard` preset embodies the paper's condition when every criterion holds on every seed (issue 13).
CRITERIA = [
    ("rs_forget_refusal", ">=", 0.95, "forget refusal after rejection steering"),
    ("easy_zero_std_2nd_half", ">=", 0.5, "unrelated zero-variance fraction, 2nd half of RULE"),
    ("reward_gap_2nd_half", ">=", 0.05, "unrelated − same-family mean reward, 2nd half"),
    ("zero_std_gap_2nd_half", ">=", 0.15, "unrelated − same-family zero-variance fraction, 2nd half"),
    ("rule_same_family_acc", "<=", 0.92, "RULE final same-family accuracy (headroom)"),
    ("rule_unrelated_acc", ">=", 0.90, "RULE final unrelated accuracy"),
]


def _runs(records: list[dict], stage: str, preset: str | None) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["stage"] == stage and r["preset"] == preset}


def _final(runs: dict[int, dict], key: str) -> dict[int, float]:
    return {s: float(r["final"].get(key, math.nan)) for s, r in runs.items()}


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _interval(values: dict[int, float], digits: int = 3, signed: bool = True) -> str:
    vals = [v for v in values.values() if math.isfinite(v)]
    if not vals:
        return "—"
    st = t_interval(vals)
    sign = "+" if signed else ""
    if st.n < 2:
        return f"{st.mean:{sign}.{digits}f}"
    return f"{st.mean:{sign}.{digits}f} [{st.low:{sign}.{digits}f}, {st.high:{sign}.{digits}f}]"


def steps_to_baseline(records: list[dict], stage: str, preset: str, steps: int) -> dict[int, int | None]:
    """Per seed, the first validation step at which ``stage`` reaches RULE's final same-family validation
    accuracy of that seed (``None``: not within the budget)."""
    base, var = _runs(records, BASELINE, preset), _runs(records, stage, preset)
    out: dict[int, int | None] = {}
    for seed in sorted(set(base) & set(var)):
        bcurve = base[seed]["curves"].get(HEADLINE_CURVE, [])
        if not bcurve:
            continue
        target = max(bcurve)[1]  # value at RULE's last validation step
        out[seed] = steps_to_reach(var[seed]["curves"].get(HEADLINE_CURVE, []), target)
    return out


def comparison_rows(records: list[dict], preset: str, steps: int) -> list[dict[str, Any]]:
    """One row per variant of ``preset``: means over seeds, paired differences and ratios against RULE."""
    base = _runs(records, BASELINE, preset)
    stages = list(dict.fromkeys(r["stage"] for r in records if r["preset"] == preset))
    rows = []
    for stage in stages:
        runs = _runs(records, stage, preset)
        row: dict[str, Any] = {"preset": preset, "variant": stage, "seeds": sorted(runs)}
        for key, _ in FINAL:
            row[key] = statistics.fmean(_final(runs, key).values())
        row["train_s"] = statistics.fmean(r["train_s"] for r in runs.values())
        if stage != BASELINE and base:
            for key in PAIRED:
                d = paired_differences(_final(runs, key), _final(base, key))
                row[f"diff/{key}"] = d
            row["ratio/train_s"] = paired_ratios({s: r["train_s"] for s, r in runs.items()},
                                                 {s: r["train_s"] for s, r in base.items()})
            row["steps_to_rule_final"] = steps_to_baseline(records, stage, preset, steps)
        rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]], steps: int) -> tuple[str, list[list[str]]]:
    """Markdown and CSV rows of :func:`comparison_rows`."""
    head = ["preset", "variant", "seeds", *[t for _, t in FINAL], "Δ same-family acc [95 % CI]",
            "Δ forget refusal", "Δ retain acc", "Δ unrelated acc", "train s", "time ratio [95 % CI]",
            f"steps to RULE's final same-family acc (of {steps})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = [head]
    for r in rows:
        cells = [r["preset"], r["variant"], str(len(r["seeds"])), *[_fmt(r[k]) for k, _ in FINAL]]
        if "ratio/train_s" in r:
            cells += [_interval(r[f"diff/{k}"]) for k in PAIRED]
            cells += [f"{r['train_s']:.1f}", _interval(r["ratio/train_s"], signed=False)]
            reach = r["steps_to_rule_final"]
            cells.append(", ".join("—" if v is None else str(v) for v in reach.values()) or "—")
        else:
            cells += ["(baseline)", "", "", "", f"{r['train_s']:.1f}", "1", ""]
        lines.append("| " + " | ".join(cells) + " |")
        table.append(cells)
    return "\n".join(lines), table


def disparity(records: list[dict], steps: int) -> list[dict[str, Any]]:
    """Per seed, the `hard` preset's calibration quantities (RS evaluation and RULE's per-kind signal)."""
    rs, rule = _runs(records, RS, None), _runs(records, BASELINE, "hard")
    out = []
    half = steps // 2
    for seed in sorted(set(rs) & set(rule)):
        c = rule[seed]["curves"]
        q = {
            "seed": seed,
            "rs_forget_refusal": rs[seed]["final"].get("forget/refusal_rate", math.nan),
            "rs_same_family_acc": rs[seed]["final"].get("boundary_hard/answer_accuracy", math.nan),
            "rs_unrelated_acc": rs[seed]["final"].get("boundary_easy/answer_accuracy", math.nan),
            "hard_reward_2nd_half": mean_over(c.get("train/reward_mean_boundary_hard", []), half),
            "easy_reward_2nd_half": mean_over(c.get("train/reward_mean_boundary_easy", []), half),
            "hard_zero_std_2nd_half": mean_over(c.get("train/zero_std_frac_boundary_hard", []), half),
            "easy_zero_std_2nd_half": mean_over(c.get("train/zero_std_frac_boundary_easy", []), half),
            "rule_same_family_acc": rule[seed]["final"].get("boundary_hard/answer_accuracy", math.nan),
            "rule_unrelated_acc": rule[seed]["final"].get("boundary_easy/answer_accuracy", math.nan),
        }
        q["reward_gap_2nd_half"] = q["easy_reward_2nd_half"] - q["hard_reward_2nd_half"]
        q["zero_std_gap_2nd_half"] = q["easy_zero_std_2nd_half"] - q["hard_zero_std_2nd_half"]
        q["met"] = {name: (q[name] >= thr if op == ">=" else q[name] <= thr) for name, op, thr, _ in CRITERIA}
        out.append(q)
    return out


def render_disparity(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per criterion, its value per seed (✓ met / ✗ missed)."""
    if not rows:
        return "(no `hard` RULE runs)"
    seeds = [r["seed"] for r in rows]
    lines = ["| criterion | " + " | ".join(f"seed {s}" for s in seeds) + " | all seeds |",
             "|" + "---|" * (len(seeds) + 2)]
    for name, op, thr, title in CRITERIA:
        cells = [f"{_fmt(r[name])} {'✓' if r['met'][name] else '✗'}" for r in rows]
        verdict = "met" if all(r["met"][name] for r in rows) else "missed"
        lines.append(f"| {title} {op} {thr} | " + " | ".join(cells) + f" | {verdict} |")
    for name, title in [("rs_same_family_acc", "same-family accuracy after RS"),
                        ("rs_unrelated_acc", "unrelated accuracy after RS"),
                        ("hard_reward_2nd_half", "same-family mean reward, 2nd half"),
                        ("easy_reward_2nd_half", "unrelated mean reward, 2nd half"),
                        ("hard_zero_std_2nd_half", "same-family zero-variance fraction, 2nd half")]:
        lines.append(f"| {title} | " + " | ".join(_fmt(r[name]) for r in rows) + " | |")
    return "\n".join(lines)


def collision_table(records: list[dict]) -> str:
    """Accuracy / refusal per collision type (mean over seeds) of every stage and preset."""
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str | None], dict[tuple[str, str], list[tuple[float, float]]]] = {}
    for r in records:
        by = r.get("by_group", {}).get("collision", {})
        for split in ("boundary_hard", "boundary_easy"):
            for ctype, v in sorted(by.get(split, {}).items()):
                k = (split, ctype)
                if k not in keys:
                    keys.append(k)
                cells.setdefault((r["stage"], r["preset"]), {}).setdefault(k, []).append(
                    (v["answer_accuracy"], v["refusal_rate"]))
    head = ["stage", "preset", *[f"{s} / {c} acc (refusal)" for s, c in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (stage, preset), by in cells.items():
        row = [stage, preset or "-"]
        for k in keys:
            vals = by.get(k, [])
            row.append(f"{statistics.fmean(a for a, _ in vals):.3f} ({statistics.fmean(b for _, b in vals):.3f})"
                       if vals else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _mean_curve(records: list[dict], stage: str, preset: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over the seeds of ``stage`` / ``preset`` of the curve ``key`` (:func:`rerule_lightning.tracking.plots.mean_curve`)."""
    from rerule_lightning.tracking.plots import mean_curve

    steps, means, _ = mean_curve([r["curves"][key] for r in records
                                  if (r["stage"], r["preset"]) == (stage, preset) and r["curves"].get(key)])
    return steps, means


def _save(fig: Any, path: str, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def plot(records: list[dict], output_dir: str) -> list[str]:
    """Curve PNGs: same-family validation accuracy per variant and preset; RULE's per-kind signal (`hard`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for preset in dict.fromkeys(r["preset"] for r in records if r["preset"]):
        fig, ax = plt.subplots(figsize=(7, 4))
        for stage in dict.fromkeys(r["stage"] for r in records if r["preset"] == preset):
            steps, ys = _mean_curve(records, stage, preset, HEADLINE_CURVE)
            if steps:
                ax.plot(steps, ys, marker="o", ms=3, label=stage)
        ax.set(xlabel="GRPO step", ylabel="same-family accuracy (validation subsample)", title=f"preset {preset}")
        ax.legend(fontsize=8)
        _save(fig, os.path.join(output_dir, f"same_family_accuracy_{preset}.png"), written)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for kind in ("forget", "boundary_hard", "boundary_easy"):
            for ax, metric in zip(axes, ("reward_mean", "zero_std_frac"), strict=True):
                steps, ys = _mean_curve(records, BASELINE, preset, f"train/{metric}_{kind}")
                if steps:  # a 5-step moving average: 1–2 same-family groups per step are noisy
                    sm = [statistics.fmean(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
                    ax.plot(steps, sm, label=kind)
        for ax, title in zip(axes, ("mean reward", "zero-variance fraction of groups"), strict=True):
            ax.set(xlabel="GRPO step", title=f"RULE, preset {preset}: {title} (5-step mean)")
            ax.legend(fontsize=8)
        _save(fig, os.path.join(output_dir, f"rule_signal_by_kind_{preset}.png"), written)
    return written


def write_outputs(output_dir: str) -> dict[str, Any]:
    """Read ``results.json`` and write ``table.md`` / ``table.csv``, ``disparity.md``, ``collisions.md``,
    ``summary.json`` and the PNGs; returns the summary."""
    with open(os.path.join(output_dir, "results.json")) as f:
        data = json.load(f)
    records, steps = data["runs"], int(data["settings"]["steps"])
    rows = [row for p in dict.fromkeys(r["preset"] for r in records if r["preset"])
            for row in comparison_rows(records, p, steps)]
    md, table = render_table(rows, steps)
    dis = disparity(records, steps)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(output_dir, "table.csv"), "w", newline="") as f:
        csv.writer(f).writerows(table)
    with open(os.path.join(output_dir, "disparity.md"), "w") as f:
        f.write(render_disparity(dis) + "\n")
    with open(os.path.join(output_dir, "collisions.md"), "w") as f:
        f.write(collision_table(records) + "\n")
    pngs = plot(records, output_dir)
    summary = {"rows": rows, "disparity": dis, "pngs": pngs,
               "wall_clock_s": {"train": sum(r["train_s"] for r in records), "fit": sum(r["fit_s"] for r in records)}}
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(md + "\n\n" + render_disparity(dis))
    return summary


__all__ = ["CRITERIA", "collision_table", "comparison_rows", "disparity", "plot", "render_disparity",
           "render_table", "steps_to_baseline", "write_outputs"]
