"""Our GRPO step against TRL's ``GRPOTrainer`` step: same model, prompts, batch and settings, alternated in one run.

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --repeats 3 --steps 6
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --repeats 3 --steps 6 --prompt_tokens 128

Setting (``configs/embedded/rule.yaml``): 16 prompts × 8 completions, ≤ 24 new tokens, temperature 1, top-p 1,
β = 0.01 with a separate frozen reference copy, ``dapo``, ε 0.2 / 0.3, AdamW lr 1e-4, grad-norm clip 1, one
torch thread, the ``rule_fact`` reward (the same function is TRL's reward function). Both start from the same
model directory (``--model``, default the rejection-steered ``.cache/rerule/runs/rs``, else the embedded
target) and see the same prompts in the same order: the first batches of the embedded datamodule
(``hard`` preset, seed 0), handed to TRL as a dataset it does not shuffle. Neither logs to a tracker (our
``--trainer.logger false``; TRL ``report_to="none"``); both still compute their step metrics.

``--prompt_tokens N`` prepends the same filler text to every prompt of both sides so that each prompt has about N
tokens (chat-template prompt lengths); the model's ``max_position_embeddings`` is raised in a temporary copy when
needed (RoPE: no new weights).

A step is timed from the framework's own step hooks: ours from ``on_train_batch_start`` to
``on_train_batch_end`` (generation, rewards, reference and policy passes, backward, optimizer, step logging), TRL's
from ``on_step_begin`` to ``on_step_end`` (its ``training_step`` generates, scores, runs the reference and policy
passes and backward; then clip and optimizer). Each repeat runs one fresh fit per side (``--steps`` + 1 steps,
the first dropped as warm-up), the side that goes first alternating between repeats so machine drift cancels;
the ratio of a repeat is our median step over TRL's. Each step is timed in wall-clock and in process CPU time
(``time.process_time``: with one thread, less sensitive to other processes on a shared machine than wall-clock).
Printed: the median ratio over repeats with its min–max spread (both clocks), the median step of each side, mean completion tokens of each side (different RNG streams: the lengths
differ a little) and the load average before and after.

TRL is an optional dependency: ``pip install -e .[bench]`` (``trl>=1.16``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FILLER = ("The archive of the guild keeps records of every author, their books, their birthplaces and the prizes "
          "they won, and readers consult it before they answer any question about the authors. ")
B, G, T = 16, 8, 24


def default_model() -> str:
    for path in (".cache/rerule/runs/rs", ".cache/rerule/embedded/target"):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise SystemExit("no model: run `rerule prepare --config configs/embedded/prepare.yaml` (and the RS stage, "
                     "`rerule fit --config configs/embedded/rs.yaml`) first, or pass --model")


def model_copy(model: str, prompt_tokens: int, workdir: str) -> str:
    """``model`` itself, or a copy with ``max_position_embeddings`` raised to fit ``prompt_tokens`` + T."""
    cfg = json.load(open(os.path.join(model, "config.json")))
    need = prompt_tokens + T + 8
    if cfg.get("max_position_embeddings", need) >= need:
        return model
    out = os.path.join(workdir, "model")
    shutil.copytree(os.path.realpath(model), out)
    cfg["max_position_embeddings"] = need
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    return out


def prefixer(tokenizer: Any, prompt_tokens: int) -> Any:
    """``prompt -> filler + prompt`` with about ``prompt_tokens`` tokens in all (identity for 0)."""
    filler_ids = tokenizer(FILLER * (1 + prompt_tokens // 8), add_special_tokens=False)["input_ids"]

    def apply(prompt: str) -> str:
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + BOS
        k = max(prompt_tokens - n, 0)
        return (tokenizer.decode(filler_ids[:k]) + " " if k else "") + prompt

    return apply


def embedded_batches(world_dir: str, steps: int) -> list[dict[str, list]]:
    """The first ``steps`` training batches of the embedded datamodule (``rule.yaml``'s settings)."""
    from datamodules.forget_retain import ForgetRetainDataModule

    dm = ForgetRetainDataModule(world_dir=world_dir, preset="hard", batch_size=B, forget_fraction=0.5, seed=0)
    dm.setup("fit")
    out = []
    for batch in dm.train_dataloader():
        out.append({k: list(v) for k, v in batch.items() if isinstance(v, (list, tuple))})
        if len(out) == steps:
            return out
    return out


def ours(model: str, world_dir: str, steps: int, prompt_fn: Any, workdir: str,
         shared: bool = True) -> tuple[list[tuple[float, float]], float]:
    """One fit of ``steps`` steps of our module; per-step seconds and mean completion tokens. ``shared=False``
    turns both prompt-sharing paths off (``share_prompt_prefix: false``, rollouts without ``prefill_once``)."""
    import functools

    import lightning as L

    import rerule_lightning.modules.grpo as gm
    from rerule_lightning.cli.commands import lightning_main
    from rerule_lightning.primitives.generation import sample_completions

    argv = ["fit", "--config", "configs/embedded/rule.yaml", "--model.init_args.policy.name_or_path", model,
            "--model.init_args.reference_path", model, "--data.init_args.world_dir", world_dir,
            "--trainer.max_steps", str(steps), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", os.path.join(workdir, "ours"),
            "--model.init_args.export_dir", "null", "--model.init_args.share_prompt_prefix", str(shared).lower()]
    gm.sample_completions = functools.partial(sample_completions, prefill_once=shared)
    cli = lightning_main(argv, run=False)
    times: list[tuple[float, float]] = []  # (wall, process CPU) seconds per step
    lengths: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
            batch["prompt"] = [prompt_fn(p) for p in batch["prompt"]]
            self.t = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any,
                               i: int) -> None:
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))
            lengths.append(float(trainer.callback_metrics.get("train/completion_length", float("nan"))))

    cli.trainer.callbacks.append(Timer())
    cli.trainer.fit(cli.model, cli.datamodule)
    return times, statistics.fmean(lengths)


def trl_steps(model: str, batches: list[dict[str, list]], prompt_fn: Any,
              workdir: str) -> tuple[list[tuple[float, float]], float]:
    """One ``GRPOTrainer.train`` over ``batches`` (one step each); per-step seconds and mean completion tokens."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rerule_lightning.rl.rewards import build_reward

    reward_fn = build_reward("rule_fact", None)

    def reward(prompts: list[str], completions: list[str], label: list, reference: list, value: list,
               target: list, **_: Any) -> list[float | None]:
        return reward_fn(prompts, [c.strip() for c in completions], labels=label, references=reference,
                         values=value, targets=target, target_aware=False, recall_threshold=0.3)

    reward.__name__ = "rule_fact"
    cols = ("prompt", "label", "reference", "value", "target")
    rows = {c: [prompt_fn(x) if c == "prompt" else x for b in batches for x in b[c]] for c in cols}
    args = GRPOConfig(output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=B * G, num_generations=G,
                      max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0, beta=0.01, loss_type="dapo",
                      epsilon=0.2, epsilon_high=0.3, scale_rewards="group", learning_rate=1e-4, weight_decay=0.01,
                      max_grad_norm=1.0, lr_scheduler_type="constant", max_steps=len(batches), logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, shuffle_dataset=False, seed=0,
                      dataloader_num_workers=0, disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(model)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_dict(rows),
                          processing_class=tok)
    times: list[tuple[float, float]] = []  # (wall, process CPU) seconds per step
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    trainer.add_callback(Timer())
    trainer.train()
    return times, statistics.fmean(lengths) if lengths else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="fits per side (>= 3 for a spread)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per fit (one more runs as warm-up)")
    ap.add_argument("--prompt_tokens", type=int, default=0, help="pad every prompt to about this many tokens "
                    "with filler text (0: the embedded prompts as they are)")
    ap.add_argument("--model", default=None, help="model directory (default: .cache/rerule/runs/rs, else the "
                    "embedded target)")
    ap.add_argument("--world_dir", default=".cache/rerule/embedded/world")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--unshared", action="store_true", help="also time our step with both prompt-sharing paths "
                    "off (share_prompt_prefix false, rollouts prefilled G times), alternated with the others")
    ap.add_argument("--output", default=None, help="write the per-step times and the summary as JSON here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.prompt_tokens < 0:
        ap.error("--repeats and --steps must be >= 1, --prompt_tokens >= 0")
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e .[bench]") from None
    import torch
    from transformers import AutoTokenizer

    from rerule_lightning.cli.commands import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = model_copy(args.model or default_model(), args.prompt_tokens, tmp)
        prompt_fn = prefixer(AutoTokenizer.from_pretrained(model), args.prompt_tokens)
        batches = embedded_batches(args.world_dir, args.steps + 1)
        mean_prompt = statistics.fmean(len(AutoTokenizer.from_pretrained(model)(prompt_fn(p))["input_ids"])
                                       for b in batches for p in b["prompt"])
        for r in range(args.repeats):
            rec: dict[str, Any] = {}
            sides = ["ours", "trl"] + (["unshared"] if args.unshared else [])
            order = sides[r % len(sides):] + sides[:r % len(sides)]  # rotated: each side goes first in turn
            for side in order:
                torch.manual_seed(0)
                work = os.path.join(tmp, f"{side}{r}")
                if side != "trl":
                    times, length = ours(model, args.world_dir, args.steps + 1, prompt_fn, work, side == "ours")
                else:
                    times, length = trl_steps(model, batches, prompt_fn, work)
                rec[side] = {"steps_s": [w for w, _ in times], "cpu_s": [c for _, c in times],
                             "median_s": statistics.median(w for w, _ in times[1:]),
                             "median_cpu_s": statistics.median(c for _, c in times[1:]), "completion_tokens": length}
            rec["ratio"] = rec["ours"]["median_s"] / rec["trl"]["median_s"]
            rec["cpu_ratio"] = rec["ours"]["median_cpu_s"] / rec["trl"]["median_cpu_s"]
            if args.unshared:
                rec["ratio_unshared"] = rec["unshared"]["median_s"] / rec["trl"]["median_s"]
                rec["cpu_ratio_unshared"] = rec["unshared"]["median_cpu_s"] / rec["trl"]["median_cpu_s"]
            runs.append(rec)
            print(f"repeat {r}: " + ", ".join(f"{k} {v['median_s'] * 1000:.0f} ms" for k, v in rec.items()
                                              if isinstance(v, dict)) + f", ratio {rec['ratio']:.3f} (CPU time: "
                  + ", ".join(f"{k} {v['median_cpu_s'] * 1000:.0f} ms" for k, v in rec.items() if isinstance(v, dict))
                  + f", ratio {rec['cpu_ratio']:.3f})", flush=True)
    ratios = [r["ratio"] for r in runs]
    cpu = [r["cpu_ratio"] for r in runs]
    summary = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
               "median_cpu_ratio": statistics.median(cpu), "min_cpu_ratio": min(cpu), "max_cpu_ratio": max(cpu),
               "ours_median_ms": 1000 * statistics.median(r["ours"]["median_s"] for r in runs),
               "trl_median_ms": 1000 * statistics.median(r["trl"]["median_s"] for r in runs),
               "ours_completion_tokens": statistics.fmean(r["ours"]["completion_tokens"] for r in runs),
               "trl_completion_tokens": statistics.fmean(r["trl"]["completion_tokens"] for r in runs),
               "mean_prompt_tokens": mean_prompt, "load_before": load_before, "load_after": os.getloadavg()}
    if args.unshared:
        un = [r["ratio_unshared"] for r in runs]
        unc = [r["cpu_ratio_unshared"] for r in runs]
        summary.update(unshared_median_ratio=statistics.median(un), unshared_min_ratio=min(un),
                       unshared_max_ratio=max(un), unshared_median_cpu_ratio=statistics.median(unc),
                       unshared_min_cpu_ratio=min(unc), unshared_max_cpu_ratio=max(unc),
                       unshared_median_ms=1000 * statistics.median(r["unshared"]["median_s"] for r in runs))
    print(f"prompt tokens ~{mean_prompt:.0f}, {args.repeats} repeats x {args.steps} steps, threads "
          f"{torch.get_num_threads()}: our step / TRL's = {summary['median_ratio']:.3f} "
          f"(min {summary['min_ratio']:.3f}, max {summary['max_ratio']:.3f}); medians ours "
          f"{summary['ours_median_ms']:.0f} ms, TRL {summary['trl_median_ms']:.0f} ms; completion tokens ours "
          f"{summary['ours_completion_tokens']:.1f}, TRL {summary['trl_completion_tokens']:.1f}; load average "
          f"{load_before[0]:.2f} before, {summary['load_after'][0]:.2f} after")
    print(f"process CPU time per step, our step / TRL's = {summary['median_cpu_ratio']:.3f} (min "
          f"{summary['min_cpu_ratio']:.3f}, max {summary['max_cpu_ratio']:.3f})")
    if args.unshared:
        print(f"unshared (both prompt-sharing paths off) / TRL's = {summary['unshared_median_ratio']:.3f} (min "
              f"{summary['unshared_min_ratio']:.3f}, max {summary['unshared_max_ratio']:.3f}); median "
              f"{summary['unshared_median_ms']:.0f} ms; CPU time ratio {summary['unshared_median_cpu_ratio']:.3f} "
              f"(min {summary['unshared_min_cpu_ratio']:.3f}, max {summary['unshared_max_cpu_ratio']:.3f})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
