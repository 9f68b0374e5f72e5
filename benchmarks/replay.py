"""Replay benchmark: RULE vs ReRULE (hard-case) vs random replay vs ReRULE without IS correction.

Every variant starts from the same rejection-steered model of its seed, runs the same number of GRPO steps
on the same prompt stream, and is evaluated on every split with every paraphrase. Runs go to MLflow.

    python benchmarks/replay.py --seeds 0 1 2 --presets hard easy --steps 60 --output_dir runs/replay_bench

Writes ``<output_dir>/replay_results.json`` and, through ``rerule report`` (grouped by the runs' tags
``rerule.preset`` and ``rerule.variant``, mean ± sample std over seeds), ``<output_dir>/report/``:
``report.md``, ``report.csv`` and the plots (reward, forget refusal, boundary accuracy, replay buffer and IS
weights against step; forget-vs-retain Pareto scatter), also logged to a run in ``<experiment>-report``.
``--report_only`` rebuilds the report from existing ``replay_results*.json`` files without training.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rerule_lightning.pipeline import StageResult, run_seed, summarise  # noqa: E402

VARIANTS = {
    "ReRULE (hard-case)": ["--config", "configs/replay/hard_case.yaml"],
    "random replay": ["--config", "configs/replay/random.yaml"],
    "ReRULE without IS": ["--config", "configs/replay/hard_case_no_is.yaml"],
    "ReRULE (boundary groups)": ["--config", "configs/replay/hard_case_boundary.yaml"],
}
DEFAULT_VARIANTS = ["ReRULE (hard-case)", "random replay", "ReRULE without IS"]


REPORT_METRICS = ["forget/refusal_rate", "boundary_hard/answer_accuracy", "boundary_easy/answer_accuracy",
                  "retain/answer_accuracy", "boundary_hard/refusal_rate", "forget/answer_accuracy",
                  "forget/forget_quality", "utility/model_utility"]


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
    ap.add_argument("--report_only", nargs="*", metavar="RESULTS_JSON", default=None,
                    help="train nothing: tag the runs listed in these replay_results*.json files (default: "
                         "<output_dir>/replay_results*.json) and write the report of all of them")
    ap.add_argument("--report_dir", default=None, help="where the report goes (default <output_dir>/report)")
    args = ap.parse_args(argv)
    report_dir = args.report_dir or os.path.join(args.output_dir, "report")
    if args.report_only is not None:
        files = args.report_only or sorted(glob.glob(os.path.join(args.output_dir, "replay_results*.json")))
        results = [r for path in files for r in json.load(open(path))["results"]]
        write_report(results, args.tracking_uri, args.experiment, report_dir)
        return 0

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
    with open(os.path.join(args.output_dir, "replay_results.json"), "w") as f:
        json.dump({"rows": all_rows, "results": all_results, "seconds": time.perf_counter() - t0,
                   "argv": sys.argv[1:] if argv is None else argv}, f, indent=2)
    write_report(all_results, args.tracking_uri, args.experiment, report_dir)
    return 0


def write_report(results: list[dict], tracking_uri: str, experiment: str, report_dir: str) -> dict:
    """``rerule report`` over the benchmark's runs, one row per (preset, variant), mean ± std over seeds.

    Tags the runs first (idempotent; runs made before the pipeline tagged them get their tags here). The
    rejection-steering model is shared by both presets, so it is one row with preset ``-``.
    """
    from rerule_lightning.report import report, tag_unit

    ids = []
    for r in results:
        preset = None if r["stage"] == "rejection steering" else r["preset"]
        tag_unit(tracking_uri, r["run_ids"], r["stage"], r["seed"], preset)
        ids += [v for v in r["run_ids"].values() if v and v != "-"]
    out = report(tracking_uri=tracking_uri, experiment=experiment, run_ids=list(dict.fromkeys(ids)),
                 group_by=["rerule.preset", "rerule.variant"], metrics=REPORT_METRICS, output_dir=report_dir,
                 report_experiment=f"{experiment}-report")
    print(open(os.path.join(report_dir, "report.md")).read())
    return out


if __name__ == "__main__":
    sys.exit(main())
