"""``rerule demo``: the main job on the embedded default, through the same CLI a user types.

prepare → rejection steering (``configs/embedded/rs.yaml``) → RULE (``configs/embedded/rule.yaml``) and
ReRULE (the same plus ``configs/replay/hard_case_fill.yaml``, the default replay variant), both from the same rejection-steered model →
evaluation (``configs/embedded/eval.yaml``) of every model, for each seed,
then a results table (forget refusal, boundary accuracy by kind, retain accuracy, wall-clock per stage, MLflow
run ids), also written to ``<output_dir>/results.json`` and ``results.md``.

Every stage runs in this process with the same pinned torch thread count (``--threads``, passed on to each
stage): the table repeats exactly on the same machine and thread count.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

COLUMNS = {
    "forget/refusal_rate": "forget refusal",
    "boundary_hard/answer_accuracy": "same-family acc",
    "boundary_easy/answer_accuracy": "unrelated acc",
    "retain/answer_accuracy": "retain acc",
    "boundary_hard/refusal_rate": "same-family refusal",
}


@dataclass
class StageResult:
    """One evaluated stage of one seed."""

    stage: str
    seed: int
    metrics: dict[str, float]
    fit_seconds: float
    run_ids: dict[str, str] = field(default_factory=dict)


def _run(argv: list[str]) -> tuple[Any, float]:
    from rerule_lightning.cli.lightning_cli import lightning_main

    t = time.perf_counter()
    cli = lightning_main(argv)
    return cli, time.perf_counter() - t


def _run_id(cli: Any) -> str:
    logger = cli.trainer.logger
    return getattr(logger, "run_id", None) or "-"


def _evaluate(model_dir: str, out_dir: str, common: list[str], retain_dir: str) -> tuple[dict[str, float], str]:
    cli, _ = _run(["test", "--config", "configs/embedded/eval.yaml", *common,
                   "--model.init_args.policy.name_or_path", model_dir,
                   "--model.init_args.eval_reference", retain_dir,
                   "--model.init_args.eval_report_path", os.path.join(out_dir, "eval.json")])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return metrics, _run_id(cli)


def run_seed(seed: int, output_dir: str, preset: str, rule_steps: int, tracking_uri: str,
             experiment: str, cache_dir: str, overlays: dict[str, list[str]] | None = None,
             rule_extra: list[str] | None = None, include_rule: bool = True,
             threads: int | None = None) -> list[StageResult]:
    """Rejection steering, then RULE and any overlay variants (each from the same RS model), each evaluated.

    Args:
        overlays: Variant name → extra CLI arguments (e.g. ``["--config", "configs/replay/hard_case.yaml"]``).
        rule_extra: Extra CLI arguments of the plain RULE run (the overlays carry their own).
        include_rule: Run the plain RULE baseline (off when another table already has it).
        threads: ``--threads`` of every stage (default: the CLI's, see
            :func:`rerule_lightning.cli.lightning_cli.resolve_threads`).
    """
    from rerule_lightning.cli.report import tag_unit

    links = os.path.join(cache_dir, "embedded")
    common = ["--trainer.logger.init_args.tracking_uri", tracking_uri,
              "--trainer.logger.init_args.experiment_name", experiment]
    if threads is not None:
        common += ["--threads", str(threads)]
    data = ["--data.init_args.world_dir", os.path.join(links, "world")]
    sdir = os.path.join(output_dir, f"seed{seed}")
    rs_dir = os.path.join(sdir, "rs")
    results: list[StageResult] = []
    rs_record = os.path.join(sdir, "rs_result.json")
    if os.path.exists(rs_record) and os.path.isdir(rs_dir):  # shared by every preset and variant of this seed
        results.append(StageResult(**json.load(open(rs_record))))
    else:
        cli, secs = _run(["fit", "--config", "configs/embedded/rs.yaml", *common, *data,
                          "--data.init_args.tokenizer", os.path.join(links, "tokenizer"),
                          "--model.init_args.policy.name_or_path", os.path.join(links, "target"),
                          "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
                          "--model.init_args.export_dir", rs_dir,
                          "--trainer.default_root_dir", os.path.join(sdir, "rs_logs")])
        rs_run = _run_id(cli)
        metrics, eval_run = _evaluate(rs_dir, os.path.join(sdir, "rs_eval"), [*common, *data],
                                      os.path.join(links, "retain"))
        results.append(StageResult("rejection steering", seed, metrics, secs, {"fit": rs_run, "eval": eval_run}))
        tag_unit(tracking_uri, results[-1].run_ids, "rejection steering", seed)  # for `rerule report`
        with open(rs_record, "w") as f:
            json.dump(results[-1].__dict__, f)
    pdir = os.path.join(sdir, preset)
    variants = {"RULE": list(rule_extra or [])} if include_rule else {}
    for name, extra in {**variants, **(overlays or {})}.items():
        tag = "".join(c if c.isalnum() else "_" for c in name.lower())
        out = os.path.join(pdir, tag)
        cli, secs = _run(["fit", "--config", "configs/embedded/rule.yaml", *extra, *common, *data,
                          "--data.init_args.preset", preset, "--trainer.max_steps", str(rule_steps),
                          "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
                          "--model.init_args.seed", str(seed), "--model.init_args.policy.name_or_path", rs_dir,
                          "--model.init_args.export_dir", out,
                          "--trainer.default_root_dir", os.path.join(pdir, f"{tag}_logs")])
        fit_run = _run_id(cli)
        metrics, eval_run = _evaluate(out, os.path.join(pdir, f"{tag}_eval"), [*common, *data],
                                      os.path.join(links, "retain"))
        results.append(StageResult(name, seed, metrics, secs, {"fit": fit_run, "eval": eval_run}))
        tag_unit(tracking_uri, results[-1].run_ids, name, seed, preset)
    return results


def summarise(results: list[StageResult]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of every table column, per stage (in first-seen order)."""
    rows = []
    for stage in dict.fromkeys(r.stage for r in results):
        rs = [r for r in results if r.stage == stage]
        row: dict[str, Any] = {"stage": stage, "seeds": len(rs)}
        for key in [*COLUMNS, "fit_seconds"]:
            vals = [r.fit_seconds if key == "fit_seconds" else r.metrics.get(key, float("nan")) for r in rs]
            row[key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        row["run_ids"] = [r.run_ids for r in rs]
        rows.append(row)
    return rows


def render_markdown(rows: list[dict[str, Any]]) -> str:
    """The results table in Markdown (mean ± std over seeds)."""
    head = ["stage", "seeds", *COLUMNS.values(), "fit wall-clock (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"], str(r["seeds"])]
        cells += [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in COLUMNS]
        cells.append(f"{r['fit_seconds'][0]:.1f} ± {r['fit_seconds'][1]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


REPLAY_OVERLAYS = {
    "hard_case": ("ReRULE (hard-case)", "configs/replay/hard_case_fill.yaml"),  # the default variant (RESULTS §5)
    "hard_case_add": ("ReRULE (add)", "configs/replay/hard_case.yaml"),
    "random": ("random replay", "configs/replay/random.yaml"),
    "hard_case_no_is": ("ReRULE without IS", "configs/replay/hard_case_no_is.yaml"),
}


def demo(seeds: list[int] | None = None, preset: str = "hard", rule_steps: int = 60,
         replay: list[str] | None = None,
         output_dir: str = "runs/demo", tracking_uri: str = "sqlite:///mlflow.db", experiment: str = "rerule-demo",
         prepare_config: str = "configs/embedded/prepare.yaml", cache_dir: str = ".cache/rerule",
         threads: int | None = None) -> list[dict]:
    """Run the main job and print its results table.

    Args:
        seeds: Seeds of the rejection-steering and RULE stages (the world and target model are fixed).
        preset: RL boundary pool: ``hard`` (20 % same-family prompts) or ``easy``.
        rule_steps: GRPO steps of the RULE stage (and of every replay variant: equal budgets).
        replay: Replay variants run side by side with RULE from the same rejection-steered model
            (``hard_case``, ``random``, ``hard_case_no_is``); default ``[hard_case]`` (ReRULE); ``[]`` for
            RULE alone.
        output_dir: Where models, eval reports and the results table are written.
        tracking_uri: MLflow tracking URI (``sqlite:///mlflow.db`` or ``http://host:port``).
        experiment: MLflow experiment name.
        prepare_config: Config of ``rerule prepare``.
        cache_dir: Cache of the prepared world and models.
        threads: torch intra-op threads of prepare and of every stage, pinned so that the table repeats
            exactly on the same machine; default $RERULE_THREADS, else $OMP_NUM_THREADS, else 2; 0 leaves
            torch's own default (one thread per core).
    """
    from rich.console import Console
    from rich.table import Table

    from rerule_lightning.cli.lightning_cli import pin_threads
    from rerule_lightning.cli.prepare import prepare_main

    if preset not in ("easy", "hard"):
        raise ValueError(f"--preset={preset!r}: choose 'easy' or 'hard'")
    if isinstance(rule_steps, bool) or not isinstance(rule_steps, int) or rule_steps < 1:
        raise ValueError(f"--rule_steps={rule_steps}: must be >= 1 (0 trains nothing: the RULE and ReRULE rows "
                         "would equal rejection steering)")
    seeds = [0] if seeds is None else list(seeds)
    if not seeds:
        raise ValueError("--seeds=[]: give at least one seed, e.g. [0]")
    replay = ["hard_case"] if replay is None else list(replay)
    unknown = [r for r in replay if r not in REPLAY_OVERLAYS]
    if unknown:
        raise ValueError(f"--replay: unknown variant(s) {unknown}; choose from {sorted(REPLAY_OVERLAYS)}")
    overlays = {REPLAY_OVERLAYS[r][0]: ["--config", REPLAY_OVERLAYS[r][1]] for r in replay}
    threads = pin_threads(threads)
    console = Console(width=None if sys.stdout.isatty() else 160)
    t0 = time.perf_counter()
    prepare_main(["--config", prepare_config, "--cache_dir", cache_dir, "--threads", str(threads)])
    prep_secs = time.perf_counter() - t0
    results: list[StageResult] = []
    for seed in seeds:
        results += run_seed(seed, output_dir, preset, rule_steps, tracking_uri, experiment, cache_dir,
                            overlays=overlays, threads=threads)
    rows = summarise(results)
    title = f"rerule demo: embedded '{preset}' preset, " + (f"seed {seeds[0]}" if len(seeds) == 1 else
                                                              f"{len(seeds)} seeds, mean ± std")
    table = Table(title=title)
    for col in ["stage", *COLUMNS.values(), "fit s"]:
        table.add_column(col)
    fmt = (lambda m: f"{m[0]:.3f}") if len(seeds) == 1 else (lambda m: f"{m[0]:.3f}±{m[1]:.3f}")
    for r in rows:
        table.add_row(r["stage"], *[fmt(r[k]) for k in COLUMNS], f"{r['fit_seconds'][0]:.0f}")
    console.print(table)
    for res in results:
        console.print(f"seed {res.seed} {res.stage}: MLflow runs fit={res.run_ids['fit']} eval={res.run_ids['eval']}")
    total = time.perf_counter() - t0
    console.print(f"prepare {prep_secs:.0f} s, total {total:.0f} s, {threads or 'default'} torch threads; "
                  f"MLflow: {tracking_uri} (mlflow ui --backend-store-uri {tracking_uri})")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "results": [r.__dict__ for r in results], "prepare_seconds": prep_secs,
                   "total_seconds": total}, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(render_markdown(rows) + "\n")
    return rows


def demo_main(argv: list[str]) -> int:
    """``rerule demo``: jsonargparse over :func:`demo` (one-line errors)."""
    from rerule_lightning.cli.lightning_cli import function_main

    function_main(demo, argv, prog="rerule demo")
    return 0
