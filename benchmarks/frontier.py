"""Methods compared at matched forgetting: the frontier benchmark of RULE, the replay variants and the baselines.

    python benchmarks/frontier.py --threads 1 --output_dir runs/frontier                 # benchmarks/frontier.yaml
    python benchmarks/frontier.py --quick --threads 1 --output_dir runs/frontier_quick   # smoke: 2 seeds, fewer points
    python benchmarks/frontier.py --analyse_only --output_dir runs/frontier              # tables and plots again
    python benchmarks/frontier.py --analyse_only --inputs runs/a runs/b --output_dir runs/ab  # two processes' runs

One code path for every method (DESIGN §3a), the sweep declared in one file (``--sweep``, default
``benchmarks/frontier.yaml``):

* RULE and each replay variant start from the seed's rejection-steered model (:class:`benchmarks.replay.Bench`,
  shared by every method of the seed); each learning rate of the sweep is one run, and every validation (every
  ``val_every`` steps) on the **selection half** of the world's authors (``data.eval_half: select``) is a
  frontier point;
* each baseline starts from the target model and validates every epoch, up to ``max_epochs``, on the same items;
* the points are recorded by :class:`benchmarks.frontier_points.FrontierPoints` (metrics, sequences forwarded and
  back-propagated, training seconds); per method, seed and constraint
  (:data:`rerule_lightning.tracking.frontier.CONSTRAINTS`) the best point is chosen on the selection half;
* every chosen point is **re-run to its step** (same settings; the re-run's validation there must equal the
  recorded one, else it is flagged) and evaluated on the **report half** (``rerule test``, every split);
* runs are tagged in MLflow (``rerule.method``, ``rerule.knob``, ``rerule.value``, ``rerule.step``) so that
  ``rerule report`` redraws them.

Resumable: every finished run and report evaluation is recorded in ``<output_dir>/results.json``
(:mod:`benchmarks.records`) as it ends; a rerun with the same ``--output_dir`` skips them. Writes ``table.md``
(per method and constraint: seeds reached, report-half accuracies and output classes at the chosen points,
compute, paired Δ vs RULE with 95 % t-intervals, the area), ``points.csv`` and ``frontier_refusal.png`` /
``frontier_accuracy.png`` (:mod:`benchmarks.frontier_analysis`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.frontier_analysis import chosen_points, merge_results, write_outputs  # noqa: E402
from benchmarks.replay import Bench, _evaluate, _lightning, _run_id  # noqa: E402

VAL_SPLITS = ["forget", "boundary_hard", "boundary_easy", "retain"]
DEFAULT_SWEEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "frontier.yaml")


@dataclass
class RunSpec:
    """One run of the sweep: a method at one setting of its knobs, trained for ``budget`` steps or epochs."""

    method: str
    family: str                       # "rl" | "baseline"
    config: str
    extra: list[str]
    knobs: dict[str, Any] = field(default_factory=dict)
    budget: int = 0                   # rl: max_steps; baseline: max_epochs

    @property
    def key(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in self.knobs.items())
        return f"{self.method}|{knobs}|{self.budget}"

    @property
    def tag(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.key.lower())


PROFILES = ("quick", "budget")


def _merge_profile(sweep: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """The sweep with its section ``name`` applied: values replace; under ``rl`` / ``baselines``, a ``methods``
    list keeps only those methods, a ``methods`` mapping keeps only those and replaces their fields (e.g. a
    baseline's ``grid``) by the ones given."""
    if not isinstance(sweep.get(name), dict):
        raise SystemExit(f"benchmarks/frontier.py: error: --profile {name}: {path} has no {name!r} section")
    out = copy.deepcopy(sweep)
    for k, v in sweep[name].items():
        if k not in ("rl", "baselines"):
            out[k] = v
            continue
        for kk, vv in v.items():
            if kk != "methods":
                out[k][kk] = vv
                continue
            unknown = [m for m in vv if m not in out[k]["methods"]]
            if unknown:
                raise SystemExit(f"benchmarks/frontier.py: error: {path}: {name}.{k}.methods: {unknown} are not "
                                 f"methods of {k} ({list(out[k]['methods'])})")
            if isinstance(vv, dict):
                out[k]["methods"] = {m: {**out[k]["methods"][m], **(vv[m] or {})} for m in vv}
            else:
                out[k]["methods"] = {m: out[k]["methods"][m] for m in vv}
    return out


def load_sweep(path: str, quick: bool = False, methods: list[str] | None = None,
               profile: str | None = None) -> dict[str, Any]:
    """The sweep file as ``{"seeds", "preset", "val_items", "runs"}``, with the section ``profile`` applied
    (``--quick`` is ``--profile quick``).

    Raises:
        SystemExit: The file is missing, a method's entry lacks ``config``, ``--methods`` names an unknown method,
            or the profile is missing or names unknown methods (the message names the file and the entry).
    """
    import yaml

    if not os.path.isfile(path):
        raise SystemExit(f"benchmarks/frontier.py: error: --sweep {path!r}: no such file")
    with open(path) as f:
        raw = yaml.safe_load(f)
    profile = "quick" if quick else profile
    sweep = _merge_profile(raw, profile, path) if profile else raw
    rl, base = sweep.get("rl") or {"methods": {}}, sweep.get("baselines") or {"methods": {}}
    known = [*rl["methods"], *base["methods"]]
    unknown = [m for m in methods or [] if m not in known]
    if unknown:
        raise SystemExit(f"benchmarks/frontier.py: error: --methods {unknown}: not in {path} (methods: {known})")
    runs: list[RunSpec] = []
    rl_extra, base_extra = [str(a) for a in rl.get("extra") or []], [str(a) for a in base.get("extra") or []]
    for name, overlay in rl["methods"].items():
        extra = [*overlay, *rl_extra]
        for mult in rl["lr_multipliers"]:
            runs.append(RunSpec(name, "rl", rl["config"], list(extra), {"learning_rate": rl["learning_rate"] * mult},
                                int(rl["steps"])))
        if rl.get("long_steps"):
            runs.append(RunSpec(name, "rl", rl["config"], list(extra), {"learning_rate": rl["learning_rate"]},
                                int(rl["long_steps"])))
    for name, m in base["methods"].items():
        if "config" not in m:
            raise SystemExit(f"benchmarks/frontier.py: error: {path}: baselines.methods.{name}: missing 'config'")
        grid = {k: (v[:1] if base.get("grid_first") else v) for k, v in (m.get("grid") or {}).items()}
        fixed = [a for k, v in (m.get("set") or {}).items() for a in (f"--model.init_args.{k}", str(v))] + base_extra
        for values in itertools.product(*grid.values()):
            runs.append(RunSpec(name, "baseline", m["config"], fixed, dict(zip(grid, values)), int(base["max_epochs"])))
    if methods:
        runs = [r for r in runs if r.method in methods]
    return {"seeds": list(sweep["seeds"]), "preset": sweep.get("preset", "hard"), "val_items": int(sweep["val_items"]),
            "val_every": int(rl.get("val_every", 5)), "val_every_epochs": int(base.get("val_every", 1)), "runs": runs}


class FrontierBench(Bench):
    """The frontier benchmark's runs on top of the replay benchmark's :class:`Bench` (RS models, records)."""

    def __init__(self, args: argparse.Namespace, sweep: dict[str, Any]) -> None:
        super().__init__(args)
        self.sweep = sweep
        self.links = os.path.join(args.cache_dir, "embedded")
        self.tracking = ["--trainer.logger.init_args.tracking_uri", args.tracking_uri,
                         "--trainer.logger.init_args.experiment_name", args.experiment,
                         "--threads", str(args.threads)]

    # ------------------------------------------------------------------------------------------ fits
    def _fit_args(self, spec: RunSpec, seed: int, rs_dir: str | None, out: str, overlay: str,
                  export: bool, val_at: int | None = None) -> list[str]:
        """CLI arguments of a sweep run; ``val_at`` validates only at that step (RL) / epoch (baselines)."""
        sw = self.sweep
        knobs = [a for k, v in spec.knobs.items() for a in (f"--model.init_args.{k}", str(v))]
        split_list = "[" + ",".join(VAL_SPLITS) + "]"
        export_args = ["--model.init_args.export_dir", out if export else "null"]
        if spec.family == "rl":
            data = "--data.init_args."
            return ["fit", "--config", spec.config, *spec.extra, "--config", overlay, *self.common,
                    "--trainer.val_check_interval", str(val_at or sw["val_every"]), "--trainer.limit_val_batches", "1.0",
                    "--trainer.check_val_every_n_epoch", "null", "--trainer.num_sanity_val_steps", "0",
                    data + "eval_splits", split_list, data + "eval_max_items", str(sw["val_items"]),
                    data + "eval_half", "select", data + "preset", sw["preset"],
                    "--trainer.max_steps", str(spec.budget), *knobs, "--seed_everything", str(seed),
                    data + "seed", str(seed), "--model.init_args.seed", str(seed),
                    "--model.init_args.policy.name_or_path", rs_dir, *export_args,
                    "--trainer.default_root_dir", out + "_logs"]
        bench = "--data.init_args.benchmark.init_args."
        return ["fit", "--config", spec.config, *spec.extra, "--config", overlay, *self.tracking,
                "--trainer.limit_val_batches", "1.0",
                "--trainer.check_val_every_n_epoch", str(val_at or sw["val_every_epochs"]),
                "--trainer.num_sanity_val_steps", "0", bench + "eval_splits", split_list,
                bench + "eval_max_items", str(sw["val_items"]), bench + "eval_half", "select",
                bench + "seed", str(seed), bench + "world_dir", os.path.join(self.links, "world"),
                bench + "preset", sw["preset"],
                "--model.init_args.policy.name_or_path", os.path.join(self.links, "target"),
                "--trainer.max_epochs", str(spec.budget), *knobs, "--seed_everything", str(seed),
                "--data.init_args.seed", str(seed), "--model.init_args.seed", str(seed), *export_args,
                "--trainer.default_root_dir", out + "_logs"]

    def _overlay(self, path: str, points: str, stop: dict[str, int] | None = None) -> str:
        init = {"path": points, **(stop or {})}
        with open(path, "w") as f:
            f.write("trainer:\n  callbacks+:\n    - class_path: benchmarks.frontier_points.FrontierPoints\n"
                    f"      init_args: {json.dumps(init)}\n")
        return path

    def run(self, spec: RunSpec, seed: int, rs_dir: str | None) -> dict[str, Any]:
        """Train one sweep run (or read its record): every validation on the selection half is a point."""
        rec = self.record(kind="run", key=spec.key, seed=seed)
        if rec is not None:
            return rec
        out = os.path.join(self.args.output_dir, f"seed{seed}", spec.tag)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        points_file = out + "_points.json"
        overlay = self._overlay(out + "_callbacks.yaml", points_file)
        cli, secs = _lightning(self._fit_args(spec, seed, rs_dir, out, overlay, export=False))
        with open(points_file) as f:
            points = json.load(f)
        run_id = _run_id(cli)
        self._tags(run_id, spec, seed, "fit")
        rec = {"kind": "run", "key": spec.key, "seed": seed, "method": spec.method, "family": spec.family,
               "knobs": spec.knobs, "budget": spec.budget, "points": points, "fit_s": secs, "run_id": run_id}
        self.save(rec)
        return rec

    def report(self, spec: RunSpec, seed: int, rs_dir: str | None, point: dict[str, Any]) -> dict[str, Any]:
        """Re-run ``spec`` to ``point`` (checked equal on the selection half) and evaluate it on the report half.

        The re-run validates only at the chosen point (validation is greedy and draws no random numbers, so the
        training is the recorded one's); when its validation differs from the recorded point it is run again
        with the recorded schedule (every point), and a second difference is recorded as ``verified: false``."""
        at = point["step"] if spec.family == "rl" else point["epoch"]
        rec = self.record(kind="report", key=spec.key, seed=seed, at=at)
        if rec is not None:
            return rec
        out = os.path.join(self.args.output_dir, f"seed{seed}", "chosen", f"{spec.tag}_at{at}")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        points_file = out + "_points.json"
        stop = {"stop_step": at} if spec.family == "rl" else {"stop_epoch": at}
        overlay = self._overlay(out + "_callbacks.yaml", points_file, stop)
        for schedule, val_at in (("chosen point only", at), ("every point", None)):
            cli, secs = _lightning(self._fit_args(spec, seed, rs_dir, out, overlay, export=True, val_at=val_at))
            with open(points_file) as f:
                rerun = json.load(f)[-1]
            verified = rerun["select"] == point["select"] and rerun["step"] == point["step"]
            used = schedule
            if verified:
                break
        common = [*self.common, "--data.init_args.eval_half", "report"]
        final, by_group, eval_id = _evaluate(out, out + "_eval", common, os.path.join(self.links, "retain"))
        fit_id = _run_id(cli)
        for rid, stage in ((fit_id, "rerun"), (eval_id, "report")):
            self._tags(rid, spec, seed, stage, step=at)
        if not self.args.keep_models:
            shutil.rmtree(out, ignore_errors=True)  # the exported model: the report is all that is kept
        rec = {"kind": "report", "key": spec.key, "seed": seed, "at": at, "method": spec.method,
               "report": final, "by_group": by_group, "rerun_select": rerun["select"],
               "verified": verified, "rerun_validations": used, "fit_s": secs, "run_ids": {"rerun": fit_id, "report": eval_id},
               "model_dir": out if self.args.keep_models else None}
        self.save(rec)
        return rec

    def _tags(self, run_id: str, spec: RunSpec, seed: int, stage: str, step: int | None = None) -> None:
        if not run_id or run_id == "-":
            return
        from mlflow.tracking import MlflowClient

        from rerule_lightning.cli.report import tag_unit

        tag_unit(self.args.tracking_uri, {stage: run_id}, spec.method, seed, self.sweep["preset"])
        client = MlflowClient(tracking_uri=self.args.tracking_uri)
        tags = {"method": spec.method, "knob": ",".join(spec.knobs) or "-",
                "value": ",".join(str(v) for v in spec.knobs.values()) or "-", "budget": str(spec.budget),
                "run_key": spec.key}
        if step is not None:
            tags["step"] = str(step)
        for k, v in tags.items():
            client.set_tag(run_id, f"rerule.{k}", v)


def run_all(bench: FrontierBench) -> None:
    """Every sweep run of every seed, then the report-half evaluation of every chosen point."""
    sweep = bench.sweep
    specs = {s.key: s for s in sweep["runs"]}
    has_rl = any(s.family == "rl" for s in sweep["runs"])
    for seed in sweep["seeds"]:
        rs_dir = bench.rs(seed) if has_rl else None
        order = sweep["runs"] if seed % 2 == 0 else list(reversed(sweep["runs"]))  # ABBA across seeds
        for spec in order:
            bench.run(spec, seed, rs_dir)
    runs = [r for r in bench.runs if r.get("kind") == "run" and r["key"] in specs and r["seed"] in sweep["seeds"]]
    for (key, seed, _at), point in chosen_points(runs).items():
        rs_dir = os.path.join(bench.args.output_dir, f"seed{seed}", "rs") if specs[key].family == "rl" else None
        bench.report(specs[key], seed, rs_dir, point)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help="the sweep file (methods, knobs, budgets, seeds)")
    ap.add_argument("--quick", action="store_true", help="apply the sweep's `quick` section (2 seeds, fewer points)")
    ap.add_argument("--profile", choices=PROFILES, default=None,
                    help="apply that section of the sweep (`budget`: the cut sweep that fits about 2 hours on two "
                         "processes of the 2-core machine; `quick` = --quick)")
    ap.add_argument("--keep_models", action="store_true",
                    help="keep the exported model of every chosen point (<output_dir>/seed<s>/chosen/...; its path "
                         "in the report record), e.g. for benchmarks/robustness.py --frontier_from")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override the sweep's seeds")
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods of the sweep (RULE is the "
                                                                 "reference of the paired statistics)")
    ap.add_argument("--output_dir", default="runs/frontier")
    ap.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="rerule-frontier")
    ap.add_argument("--prepare_config", default="configs/embedded/prepare.yaml")
    ap.add_argument("--cache_dir", default=".cache/rerule", help="prepared world and models")
    ap.add_argument("--no_prepare", action="store_true",
                    help="use the world and models already prepared in --cache_dir as they are")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of every stage, pinned so that re-runs repeat exactly "
                         "(default: $RERULE_THREADS, else $OMP_NUM_THREADS, else 2)")
    ap.add_argument("--analyse_only", action="store_true", help="train nothing; rebuild outputs from results.json")
    ap.add_argument("--inputs", nargs="+", default=None,
                    help="with --analyse_only: merge the results.json of these output directories (e.g. the RL "
                         "methods and the baselines, run as two processes) into --output_dir first")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inputs and not args.analyse_only:
        raise SystemExit("benchmarks/frontier.py: error: --inputs is for --analyse_only (merging finished runs)")
    if args.analyse_only:
        if args.inputs:
            merge_results(args.inputs, args.output_dir)
        write_outputs(args.output_dir)
        return 0
    sweep = load_sweep(args.sweep, args.quick, args.methods, args.profile)
    if args.seeds:
        sweep["seeds"] = list(args.seeds)
    from rerule_lightning.cli.commands import main as cli_main
    from rerule_lightning.cli.lightning_cli import pin_threads

    args.threads = pin_threads(args.threads)
    if not args.no_prepare:
        rc = cli_main(["prepare", "--config", args.prepare_config, "--cache_dir", args.cache_dir,
                       "--threads", str(args.threads)])
        if rc:
            return int(rc)
    args.sweep_runs = [s.key for s in sweep["runs"]]
    args.sweep_seeds = sweep["seeds"]
    bench = FrontierBench(args, sweep)
    t0 = time.perf_counter()
    run_all(bench)
    print(f"frontier benchmark: {time.perf_counter() - t0:.0f} s of training and evaluation", file=sys.stderr)
    write_outputs(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
