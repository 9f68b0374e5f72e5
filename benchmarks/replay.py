"""Replay benchmark: RULE vs ReRULE (hard-case) vs random replay vs ReRULE without IS correction.

Every variant starts from the same rejection-steered model of its seed, runs the same number of GRPO steps
on the same prompt stream, and is evaluated on every split with every paraphrase. Runs go to MLflow.

    python benchmarks/replay.py --seeds 0 1 2 --presets hard easy --steps 60 --output_dir runs/replay_bench

Writes ``<output_dir>/replay_table.md``, ``replay_table.csv``, ``replay_results.json`` and
``boundary_accuracy_vs_step.png`` (same-family boundary accuracy from the validation runs during fit).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rerule_lightning.pipeline import COLUMNS, StageResult, run_seed, summarise  # noqa: E402

VARIANTS = {
    "ReRULE (hard-case)": ["--config", "configs/replay/hard_case.yaml"],
    "random replay": ["--config", "configs/replay/random.yaml"],
    "ReRULE without IS": ["--config", "configs/replay/hard_case_no_is.yaml"],
    "ReRULE (boundary groups)": ["--config", "configs/replay/hard_case_boundary.yaml"],
}
DEFAULT_VARIANTS = ["ReRULE (hard-case)", "random replay", "ReRULE without IS"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (>= 3 for the docs table)")
    ap.add_argument("--presets", nargs="+", default=["hard", "easy"], choices=["hard", "easy"])
    ap.add_argument("--steps", type=int, default=60, help="GRPO steps of every variant (equal budgets)")
    ap.add_argument("--output_dir", default="runs/replay_bench")
    ap.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="rerule-replay-bench")
    ap.add_argument("--cache_dir", default=".cache/rerule")
    ap.add_argument("--val_every", type=int, default=20, help="validation interval (steps) for the curves")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--no_baseline", action="store_true", help="skip the plain RULE run (already in another table)")
    args = ap.parse_args(argv)

    from rerule_lightning.cli import main as cli_main

    cli_main(["prepare", "--config", "configs/embedded/prepare.yaml", "--cache_dir", args.cache_dir])
    # cheap curves during fit: the two boundary splits, 100 items each; the final evaluation covers everything
    val = ["--trainer.val_check_interval", str(args.val_every), "--trainer.limit_val_batches", "1.0",
           "--trainer.check_val_every_n_epoch", "null", "--data.init_args.eval_splits", "[boundary_hard,boundary_easy]",
           "--data.init_args.eval_max_items", "100"]
    overlays = {name: [*VARIANTS[name], *val] for name in args.variants}
    all_rows, all_results = [], []
    t0 = time.perf_counter()
    for preset in args.presets:
        results: list[StageResult] = []
        for seed in args.seeds:
            results += run_seed(seed, args.output_dir, preset, args.steps, args.tracking_uri, args.experiment, args.cache_dir,
                                overlays=overlays, rule_extra=None if args.no_baseline else val,
                                include_rule=not args.no_baseline)
        for row in summarise(results):
            all_rows.append({"preset": preset, **row})
        all_results += [{"preset": preset, **r.__dict__} for r in results]
    os.makedirs(args.output_dir, exist_ok=True)
    write_tables(all_rows, args.output_dir)
    with open(os.path.join(args.output_dir, "replay_results.json"), "w") as f:
        json.dump({"rows": all_rows, "results": all_results, "seconds": time.perf_counter() - t0,
                   "argv": sys.argv[1:] if argv is None else argv}, f, indent=2)
    plot_curves(all_results, args.tracking_uri, os.path.join(args.output_dir, "boundary_accuracy_vs_step.png"))
    print(open(os.path.join(args.output_dir, "replay_table.md")).read())
    return 0


def write_tables(rows: list[dict], out_dir: str) -> None:
    """Markdown and CSV tables: one row per (preset, variant), mean ± std over seeds."""
    head = ["preset", "variant", "seeds", *COLUMNS.values(), "fit wall-clock (s)"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with open(os.path.join(out_dir, "replay_table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["preset", "variant", "seeds", *[f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")],
                    "fit_seconds_mean", "fit_seconds_std"])
        for r in rows:
            cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in COLUMNS]
            md.append("| " + " | ".join([r["preset"], r["stage"], str(r["seeds"]), *cells,
                                         f"{r['fit_seconds'][0]:.1f} ± {r['fit_seconds'][1]:.1f}"]) + " |")
            w.writerow([r["preset"], r["stage"], r["seeds"], *[x for k in COLUMNS for x in r[k]], *r["fit_seconds"]])
    with open(os.path.join(out_dir, "replay_table.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def plot_curves(results: list[dict], tracking_uri: str, path: str) -> None:
    """Same-family boundary accuracy against step, mean over seeds, one line per (preset, variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in results:
        if r["stage"] == "rejection steering" or r["run_ids"].get("fit", "-") == "-":
            continue
        hist = client.get_metric_history(r["run_ids"]["fit"], "boundary_hard/answer_accuracy")
        for m in hist:
            curves.setdefault((r["preset"], r["stage"]), {}).setdefault(m.step, []).append(m.value)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (preset, stage), pts in sorted(curves.items()):
        steps = sorted(pts)
        ax.plot(steps, [sum(pts[s]) / len(pts[s]) for s in steps], marker="o",
                linestyle="-" if preset == "hard" else "--", label=f"{preset}: {stage}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("same-family boundary accuracy")
    ax.set_title("Replay benchmark (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
