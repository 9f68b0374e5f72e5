"""Where one GRPO step spends its time: RULE and ReRULE on the embedded default, median over steps.

    python benchmarks/step_profile.py --steps 30 --collect_steps 10 --output docs/step_profile.json

Runs ``rerule fit --config configs/embedded/rule.yaml`` (16 prompts × 8 completions, 24 new tokens, `hard`
preset, MLflow logging to a throw-away sqlite store), once as is (RULE) and once with
``configs/replay/hard_case.yaml`` (ReRULE, ``collect_steps`` overridden so that replay is active for most
steps), and times every step from the outside: the module's methods, the optimizer, the replay callback's hooks
and the logger are wrapped with timers (nothing in ``training_step`` is edited). Time is *exclusive*: a timed
call inside another (the reference pass inside ``replay_inputs``) counts only in its own category.

Categories (per step, i.e. one ``fit_loop.epoch_loop.advance``):

* generation: ``_sample`` (tokenise, ``generate`` under ``inference_mode``, decode);
* reward scoring: the reward function;
* behaviour log-probs: always 0 — no separate pass (π_old is the detached first forward pass, μ = 1);
* reference log-probs: ``sequence_logprobs(reference=True)`` of fresh and replayed sequences;
* forward: the policy's ``sequence_logprobs`` (fresh and replayed) plus ``grpo_loss`` and ``replay_loss``;
* backward: ``manual_backward``;
* optimizer: ``optimizer.step``, ``zero_grad`` and ``clip_gradients``;
* replay bookkeeping: the replay callback's batch hooks, ``replay_inputs`` (its reference pass excluded) and
  ``_groups`` (packing the step's RolloutGroups for the callback contract; it runs without replay too);
* logging: ``_log_step`` (``self.log_dict``) and the logger's ``log_metrics`` (MLflow writes);
* rest: step total − the sum of the above (data loading, Lightning's loop, advantages, ...).

Every category is timed on two clocks, wall-clock and process CPU time (``time.process_time``): on a shared,
loaded machine a one-thread process waits for a core, which inflates wall-clock but not CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CATEGORIES = ["generation", "reward scoring", "behaviour log-probs", "reference log-probs", "forward", "backward",
              "optimizer", "replay bookkeeping", "logging", "rest"]
CORE = {"generation", "forward", "backward", "optimizer"}


class StepTimer:
    """Exclusive time per category, accumulated per step, on two clocks: wall-clock (``steps``) and process CPU
    time (``cpu_steps``; with one torch thread it barely moves when other processes load the machine)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.current_cpu: dict[str, float] = defaultdict(float)
        self.stack: list[list[float]] = []  # [wall start, cpu start, child wall, child cpu] per open call
        self.steps: list[dict[str, float]] = []
        self.cpu_steps: list[dict[str, float]] = []

    def wrap(self, fn: Callable, category: str | Callable[..., str]) -> Callable:
        """``fn`` timed into ``category`` (or ``category(*args, **kwargs)``)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), time.process_time(), 0.0, 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - frame[0], time.process_time() - frame[1]
                self.stack.pop()
                cat = category(*args, **kwargs) if callable(category) else category
                self.current[cat] += wall - frame[2]
                self.current_cpu[cat] += cpu - frame[3]
                if self.stack:
                    self.stack[-1][2] += wall
                    self.stack[-1][3] += cpu

        return timed

    def wrap_step(self, fn: Callable) -> Callable:
        """The step boundary: total time, the rest, and a fresh accumulator (both clocks)."""

        def step(*args: Any, **kwargs: Any) -> Any:
            self.current, self.current_cpu = defaultdict(float), defaultdict(float)
            t, c = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            for steps, cur, total in ((self.steps, self.current, time.perf_counter() - t),
                                      (self.cpu_steps, self.current_cpu, time.process_time() - c)):
                rec = {k: cur.get(k, 0.0) for k in CATEGORIES if k != "rest"}
                rec["rest"] = total - sum(rec.values())
                rec["total"] = total
                steps.append(rec)
            return out

        return step


def instrument(trainer: Any, module: Any, timer: StepTimer) -> None:
    """Wrap the step's pieces (instance attributes only; module code untouched)."""
    import lightning as L

    import rerule_lightning.modules.grpo as gm

    module._sample = timer.wrap(module._sample, "generation")
    module.reward_fn = timer.wrap(module.reward_fn, "reward scoring")
    module.sequence_logprobs = timer.wrap(
        module.sequence_logprobs, lambda *a, reference=False, **k: "reference log-probs" if reference else "forward")
    gm.grpo_loss = timer.wrap(gm.grpo_loss, "forward")
    module.replay_loss = timer.wrap(module.replay_loss, "forward")
    module.manual_backward = timer.wrap(module.manual_backward, "backward")
    module.clip_gradients = timer.wrap(module.clip_gradients, "optimizer")
    module.replay_inputs = timer.wrap(module.replay_inputs, "replay bookkeeping")
    module._groups = timer.wrap(module._groups, "replay bookkeeping")
    module._log_step = timer.wrap(module._log_step, "logging")
    for cb in trainer.callbacks:
        if hasattr(cb, "buffer"):
            cb.on_train_batch_start = timer.wrap(cb.on_train_batch_start, "replay bookkeeping")
            cb.on_train_batch_end = timer.wrap(cb.on_train_batch_end, "replay bookkeeping")
    for lg in trainer.loggers:
        lg.log_metrics = timer.wrap(lg.log_metrics, "logging")
    loop = trainer.fit_loop.epoch_loop
    loop.advance = timer.wrap_step(loop.advance)

    class OptimizerTimer(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            for opt in trainer.optimizers:
                opt.step = timer.wrap(opt.step, "optimizer")
                opt.zero_grad = timer.wrap(opt.zero_grad, "optimizer")

    trainer.callbacks.append(OptimizerTimer())


def profile(steps: int, replay: bool, collect_steps: int,
            workdir: str) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """One instrumented fit; returns the per-step records (wall-clock, process CPU time)."""
    from rerule_lightning.cli.commands import lightning_main, quiet_libraries

    quiet_libraries()
    argv = ["fit", "--config", "configs/embedded/rule.yaml"]
    if replay:
        argv += ["--config", "configs/replay/hard_case.yaml"]
    argv += ["--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false",
             "--trainer.logger.init_args.tracking_uri", f"sqlite:///{workdir}/mlflow.db",
             "--trainer.default_root_dir", os.path.join(workdir, "logs"),
             "--model.init_args.export_dir", "null"]
    cli = lightning_main(argv, run=False)
    for cb in cli.trainer.callbacks:
        if hasattr(cb, "replay_start_arg"):  # collection runs throughout; replay from step `collect_steps` on
            cb.replay_start_arg = collect_steps
    timer = StepTimer()
    instrument(cli.trainer, cli.model, timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return timer.steps, timer.cpu_steps


def summarise(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median of each category and of the step total (seconds); ``overhead`` = non-core share of the total."""
    med = {k: statistics.median(s[k] for s in steps) for k in [*CATEGORIES, "total"]}
    med["overhead_share"] = sum(med[c] for c in CATEGORIES if c not in CORE) / med["total"]
    med["overhead_share_ref_as_forward"] = (med["overhead_share"] - med["reference log-probs"] / med["total"])
    return med


def render(cols: dict[str, dict[str, float]]) -> str:
    """Markdown table: median ms and share of the median step per category, one column pair per run."""
    head = "| category | " + " | ".join(f"{n} (ms) | {n} (%)" for n in cols) + " |"
    lines = [head, "|---|" + "---|---|" * len(cols)]
    for c in [*CATEGORIES, "total"]:
        cells = [f"{m[c] * 1000:.1f} | {100 * m[c] / m['total']:.1f}" for m in cols.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **non-core share** (all but generation, forward, backward, optimizer) | " + " | ".join(
        f"| **{100 * m['overhead_share']:.1f}**" for m in cols.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--collect_steps", type=int, default=10, help="ReRULE collect phase (steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--output", default=None, help="write per-step records and medians as JSON here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict[str, float]]] = {}
    cpu_runs: dict[str, list[dict[str, float]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        runs["RULE"], cpu_runs["RULE"] = profile(args.steps, False, args.collect_steps, os.path.join(tmp, "rule"))
        runs["ReRULE"], cpu_runs["ReRULE"] = profile(args.steps, True, args.collect_steps,
                                                     os.path.join(tmp, "rerule"))
    out: dict[str, Any] = {"args": vars(args), "load_before": load_before, "load_after": os.getloadavg()}
    for clock, rs in (("wall-clock", runs), ("process CPU time", cpu_runs)):
        cols = {"RULE": summarise(rs["RULE"]), "ReRULE": summarise(rs["ReRULE"]),
                "ReRULE hybrid steps": summarise(rs["ReRULE"][args.collect_steps:])}
        print(f"{clock}: {args.steps} steps per run, ReRULE collect_steps {args.collect_steps}, torch threads "
              f"{torch.get_num_threads()}; medians over steps; load average {load_before[0]:.2f} before, "
              f"{out['load_after'][0]:.2f} after")
        print(render(cols))
        for name, m in cols.items():
            print(f"{name}: non-core share {100 * m['overhead_share']:.1f} % "
                  f"(with the reference pass counted as forward: {100 * m['overhead_share_ref_as_forward']:.1f} %)")
        key = "medians" if clock == "wall-clock" else "cpu_medians"
        out[key] = cols
    out["steps"], out["cpu_steps"] = runs, cpu_runs
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
