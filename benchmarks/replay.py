"""Paired replay benchmark on the embedded world: every variant against on-policy RULE, seed by seed.

    python benchmarks/replay.py --seeds 0 1 2 3 4 --presets hard easy --steps 60 --output_dir runs/replay_bench

One code path for every variant (DESIGN §3a):

* per seed, one rejection-steered (RS) model; RULE and every replay variant start from it, with the same data
  seed (same prompt stream) and the same budget of GRPO steps; each is then evaluated on every split;
* validation every ``--val_every`` steps on a fixed subsample (``--val_items`` per split, the same items for
  every variant of a seed) of the forget, same-family and unrelated splits gives the curves;
* per step the module logs, per prompt kind, mean reward, zero-variance fraction and group count
  (``train/reward_mean_<kind>``, ``train/zero_std_frac_<kind>``, ``train/groups_<kind>``);
* runs of a seed are interleaved, RULE first on even seeds and last on odd ones (ABBA), so the machine's slow
  drift cancels in the paired wall-clock ratios; training time excludes validation (:class:`benchmarks.timing.PhaseTimer`);
* ``--prepare_config`` / ``--world KEY=VALUE`` run the same comparison on another world (another seed, family
  count, collision count) in its own cache directory.

Writes to ``--output_dir``: ``results.json`` (every run: final metrics, per-author / per-collision accuracy,
curves, times, MLflow run ids), ``table.md`` / ``table.csv`` (per preset and variant: mean over seeds and the
paired difference against RULE with a 95 % t-interval, wall-clock ratio, steps to reach RULE's final
same-family accuracy), ``disparity.md`` (the `hard` preset's calibration criteria per seed, met or missed) and
curve PNGs. Completed runs are recorded as they finish, so a rerun with the same ``--output_dir`` resumes.
``--analyse_only`` rebuilds the tables and plots from ``results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.records import RunRecords  # noqa: E402
from benchmarks.replay_analysis import write_outputs  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "RULE": [],
    # the default ReRULE variant (docs/RESULTS.md §5): spend: fill, stored group advantages
    "ReRULE (fill, group adv.)": ["--config", "configs/replay/hard_case_fill.yaml"],
    "ReRULE (add, group adv.)": ["--config", "configs/replay/hard_case.yaml"],
    # selection rounds 1-2 (RESULTS §5): running advantages, round 1 also without label balance
    "ReRULE (fill, running adv.)": ["--config", "configs/replay/hard_case_fill.yaml",
                                    "--trainer.callbacks.init_args.advantages", "running"],
    "ReRULE (add, running adv.)": ["--config", "configs/replay/hard_case.yaml",
                                   "--trainer.callbacks.init_args.advantages", "running"],
    # selection round 4 (RESULTS §5): running advantages for the forget label only, so that zero-variance hard
    # forget groups (every completion answers) are stored and replayed; boundary keeps its stored advantages
    "ReRULE (fill, label adv.)": ["--config", "configs/replay/hard_case_fill.yaml",
                                  "--trainer.callbacks.init_args.advantages", "{forget: running, boundary: group}"],
    "ReRULE (add, label adv.)": ["--config", "configs/replay/hard_case.yaml",
                                 "--trainer.callbacks.init_args.advantages", "{forget: running, boundary: group}"],
    "random replay": ["--config", "configs/replay/random.yaml"],
    "ReRULE without IS": ["--config", "configs/replay/hard_case_no_is.yaml"],
    "ReRULE (boundary groups)": ["--config", "configs/replay/hard_case_boundary.yaml"],
    "prompt replay": ["--config", "configs/replay/prompt_replay.yaml"],
}
DEFAULT_VARIANTS = ["RULE", "ReRULE (fill, group adv.)", "random replay", "ReRULE without IS"]
VAL_SPLITS = ["forget", "boundary_hard", "boundary_easy"]
CURVE_PREFIXES = ("train/reward_mean_", "train/zero_std_frac_", "train/groups_", "replay/")
TIMER_OVERLAY = "trainer:\n  callbacks+:\n    - class_path: benchmarks.timing.PhaseTimer\n"


def _lightning(argv: list[str]) -> tuple[Any, float]:
    from rerule_lightning.cli.commands import lightning_main

    t = time.perf_counter()
    cli = lightning_main(argv)
    return cli, time.perf_counter() - t


def _run_id(cli: Any) -> str:
    return getattr(cli.trainer.logger, "run_id", None) or "-"


def _history(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every curve of a fit run: validation metrics of the evaluated splits and the per-kind / replay signals."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    keys = [k for k in client.get_run(run_id).data.metrics
            if k.startswith(CURVE_PREFIXES) or k.split("/", 1)[0] in VAL_SPLITS]
    # Lightning logs a validation that follows the k-th training step at step k − 1 (the training metrics of
    # that step carry the same index); the curves count completed GRPO steps, so validation points move by 1.
    shift = {k: 1 if k.split("/", 1)[0] in VAL_SPLITS else 0 for k in keys}
    return {k: sorted((int(m.step) + shift[k], float(m.value)) for m in client.get_metric_history(run_id, k))
            for k in keys}


def _evaluate(model_dir: str, out_dir: str, common: list[str], retain: str) -> tuple[dict[str, float], dict, str]:
    report = os.path.join(out_dir, "eval.json")
    cli, _ = _lightning(["test", "--config", "configs/embedded/eval.yaml", *common,
                         "--model.init_args.policy.name_or_path", model_dir,
                         "--model.init_args.eval_reference", retain, "--model.init_args.eval_report_path", report])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    with open(report) as f:
        by_group = json.load(f).get("by_group", {})
    return metrics, by_group, _run_id(cli)


def check_buffer_used(name: str, seed: int, preset: str, curves: dict[str, list[tuple[int, float]]]) -> None:
    """A replay variant whose buffer never admitted a group is RULE under another name: fail loudly.

    Raises:
        RuntimeError: Naming the variant, seed and preset, when a run that logged replay metrics never had a
            group in its buffer.
    """
    sizes = curves.get("replay/buffer_size")
    if name == "RULE" or sizes is None:
        return
    if max((v for _, v in sizes), default=0.0) <= 0:
        raise RuntimeError(f"variant {name!r} (seed {seed}, preset {preset}): the replay buffer stayed empty for the "
                           "whole run, so the variant trained exactly as RULE; its admission rule stores nothing here")


class Bench(RunRecords):
    """State of one benchmark run: settings, the record file and the finished runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.links = os.path.join(args.cache_dir, "embedded")
        self.common = ["--trainer.logger.init_args.tracking_uri", args.tracking_uri,
                       "--trainer.logger.init_args.experiment_name", args.experiment,
                       "--data.init_args.world_dir", os.path.join(self.links, "world")]
        if getattr(args, "threads", None) is not None:
            self.common += ["--threads", str(args.threads)]
        self.timer = os.path.join(args.output_dir, "timer.yaml")
        with open(self.timer, "w") as f:
            f.write(TIMER_OVERLAY)

    def find(self, stage: str, seed: int, preset: str | None) -> dict[str, Any] | None:
        return self.record(stage=stage, seed=seed, preset=preset)

    def rs(self, seed: int) -> str:
        """The seed's rejection-steered model (trained once, shared by every preset and variant)."""
        out = os.path.join(self.args.output_dir, f"seed{seed}", "rs")
        if self.find("rejection steering", seed, None) is None:
            cli, secs = _lightning(["fit", "--config", "configs/embedded/rs.yaml", *self.common,
                                    "--data.init_args.tokenizer", os.path.join(self.links, "tokenizer"),
                                    "--model.init_args.policy.name_or_path", os.path.join(self.links, "target"),
                                    "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
                                    "--model.init_args.export_dir", out,
                                    "--trainer.default_root_dir", out + "_logs"])
            fit_id = _run_id(cli)
            final, by_group, eval_id = _evaluate(out, out + "_eval", self.common, os.path.join(self.links, "retain"))
            self._tag({"fit": fit_id, "eval": eval_id}, "rejection steering", seed, None)
            self.save({"stage": "rejection steering", "seed": seed, "preset": None, "final": final,
                       "by_group": by_group, "curves": {}, "fit_s": secs, "train_s": secs, "val_s": 0.0,
                       "run_ids": {"fit": fit_id, "eval": eval_id}})
        return out

    def variant(self, name: str, seed: int, preset: str, rs_dir: str) -> None:
        if self.find(name, seed, preset) is not None:
            return
        a = self.args
        tag = "".join(c if c.isalnum() else "_" for c in name.lower())
        out = os.path.join(a.output_dir, f"seed{seed}", preset, tag)
        val = ["--trainer.val_check_interval", str(a.val_every), "--trainer.limit_val_batches", "1.0",
               "--trainer.check_val_every_n_epoch", "null", "--trainer.num_sanity_val_steps", "0",
               "--data.init_args.eval_splits", "[" + ",".join(VAL_SPLITS) + "]",
               "--data.init_args.eval_max_items", str(a.val_items)]
        cli, secs = _lightning(["fit", "--config", "configs/embedded/rule.yaml", *VARIANTS[name], "--config", self.timer,
                                *self.common, *val, "--data.init_args.preset", preset,
                                "--trainer.max_steps", str(a.steps), "--seed_everything", str(seed),
                                "--data.init_args.seed", str(seed), "--model.init_args.seed", str(seed),
                                "--model.init_args.policy.name_or_path", rs_dir, "--model.init_args.export_dir", out,
                                "--trainer.default_root_dir", out + "_logs"])
        timer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PhaseTimer")
        val_s, train_s = timer.val_s, timer.train_s
        fit_id = _run_id(cli)
        curves = _history(a.tracking_uri, fit_id)
        check_buffer_used(name, seed, preset, curves)
        final, by_group, eval_id = _evaluate(out, out + "_eval", self.common, os.path.join(self.links, "retain"))
        self._tag({"fit": fit_id, "eval": eval_id}, name, seed, preset)
        self.save({"stage": name, "seed": seed, "preset": preset, "final": final, "by_group": by_group,
                   "curves": curves, "fit_s": secs, "train_s": train_s, "val_s": val_s,
                   "run_ids": {"fit": fit_id, "eval": eval_id}})

    def _tag(self, run_ids: dict[str, str], stage: str, seed: int, preset: str | None) -> None:
        from rerule_lightning.cli.report import tag_unit

        tag_unit(self.args.tracking_uri, run_ids, stage, seed, preset)


def _world_overrides(pairs: list[str]) -> list[str]:
    out = []
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise SystemExit(f"benchmarks/replay.py: error: --world {p!r}: expected KEY=VALUE (e.g. seed=1)")
        out += [f"--world.{key}", value]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (>= 5 for the docs)")
    ap.add_argument("--presets", nargs="+", default=["hard", "easy"], choices=["hard", "easy"])
    ap.add_argument("--steps", type=int, default=60, help="GRPO steps of every variant (equal budgets)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                    help="variants; RULE (the paired baseline) is always run")
    ap.add_argument("--val_every", type=int, default=5, help="validation interval in steps (the curves)")
    ap.add_argument("--val_items", type=int, default=48, help="validation items per split (fixed per seed)")
    ap.add_argument("--output_dir", default="runs/replay_bench")
    ap.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="rerule-replay-bench")
    ap.add_argument("--prepare_config", default="configs/embedded/prepare.yaml",
                    help="config of `rerule prepare` (the world and models compared on)")
    ap.add_argument("--world", nargs="*", default=[], metavar="KEY=VALUE",
                    help="world overrides on top of --prepare_config, e.g. seed=1 num_families=30")
    ap.add_argument("--cache_dir", default=None, help="prepared world and models (default: .cache/rerule, or "
                                                      ".cache/rerule-<hash> when --world or --prepare_config differ)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of prepare and every stage, pinned so that the benchmark repeats "
                         "exactly on the same machine (default: $RERULE_THREADS, else $OMP_NUM_THREADS, else 2)")
    ap.add_argument("--analyse_only", action="store_true", help="train nothing; rebuild outputs from results.json")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.val_every < 1 or args.val_items < 1:
        ap.error("--steps, --val_every and --val_items must be >= 1")
    args.variants = ["RULE", *[v for v in args.variants if v != "RULE"]]
    if args.cache_dir is None:
        default = (args.prepare_config == "configs/embedded/prepare.yaml" and not args.world)
        key = hashlib.sha256(json.dumps([args.prepare_config, args.world]).encode()).hexdigest()[:8]
        args.cache_dir = ".cache/rerule" if default else f".cache/rerule-{key}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.analyse_only:
        write_outputs(args.output_dir)
        return 0
    from rerule_lightning.cli.commands import main as cli_main
    from rerule_lightning.cli.lightning_cli import pin_threads

    args.threads = pin_threads(args.threads)  # and every stage gets --threads (Bench.common)
    world = _world_overrides(args.world)
    rc = cli_main(["prepare", "--config", args.prepare_config, "--cache_dir", args.cache_dir, *world,
                   "--threads", str(args.threads)])
    if rc:
        return int(rc)
    bench = Bench(args)
    t0 = time.perf_counter()
    for seed in args.seeds:
        rs_dir = bench.rs(seed)
        for preset in args.presets:
            order = args.variants if seed % 2 == 0 else list(reversed(args.variants))  # ABBA across seeds
            for name in order:
                bench.variant(name, seed, preset, rs_dir)
    print(f"benchmark: {time.perf_counter() - t0:.0f} s of training and evaluation", file=sys.stderr)
    write_outputs(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
