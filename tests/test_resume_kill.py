"""Kill and resume: a ReRULE fit (``rerule fit`` in a subprocess) SIGKILLed inside the hybrid phase and resumed
with ``--ckpt_path last`` ends with exactly the parameters, replay buffer and eval metrics of an uninterrupted
run; a kill during a checkpoint write never leaves a half-written ``last.ckpt``."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rerule_lightning.primitives.checkpointing import AtomicCheckpointIO, validate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"
HARD_CASE = ROOT / "configs" / "replay" / "hard_case.yaml"
MAX_STEPS, EVERY, COLLECT = 8, 2, 4  # hard_case.yaml: collect_steps 0.5 -> 4 of 8 steps
TIMEOUT_S = 240

SLOW_CALLBACK = '''
import time
import lightning as L


class Slow(L.Callback):
    """Gives the test time to kill the run between two checkpoints (sleeping changes no result)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.3)
'''


def overlay(tmp: Path, name: str, slow: bool) -> Path:
    """Checkpoints every EVERY steps (+ last), a CSV logger for the eval metrics, an end-of-fit validation."""
    ckpt_dir, log_dir = tmp / name / "ckpt", tmp / name / "logs"
    slow_cb = "    - class_path: slow_callback.Slow\n" if slow else ""
    text = textwrap.dedent(f"""\
        trainer:
          enable_checkpointing: true
          logger:
            class_path: lightning.pytorch.loggers.CSVLogger
            init_args: {{save_dir: {log_dir}, name: run, version: 0}}
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: {EVERY}, save_last: true, save_top_k: -1}}
        """) + slow_cb
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def fit_command(tiny_prepared: dict, tmp: Path, name: str, slow: bool = False, resume: bool = False) -> list[str]:
    links = tiny_prepared["links"]
    # hard_case.yaml comes last so that the --trainer.callbacks.init_args.* flags apply to its callback: with
    # the tiny memorising model, few groups pass its default admission rule, and the test needs replay to happen
    cmd = [sys.executable, "-m", "rerule_lightning.cli", "fit", "--config", str(RULE),
           "--config", str(overlay(tmp, name, slow)), "--config", str(HARD_CASE),
           "--trainer.callbacks.init_args.reward_threshold", "1.0",
           "--trainer.callbacks.init_args.require_variance", "false",
           "--model.init_args.policy.name_or_path", links["target"], "--data.init_args.world_dir", links["world"],
           "--data.init_args.batch_size", "4", "--model.init_args.num_generations", "4",
           "--model.init_args.max_new_tokens", "6", "--model.init_args.temperature", "2.0",
           "--model.init_args.learning_rate", "0.001", "--model.init_args.export_dir", "null",
           "--model.init_args.eval_max_new_tokens", "8", "--data.init_args.epoch_length", str(MAX_STEPS),
           "--data.init_args.eval_splits", "[forget,boundary_hard]", "--data.init_args.eval_max_items", "6",
           "--trainer.max_steps", str(MAX_STEPS), "--trainer.limit_val_batches", "1",
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp / name)]
    return cmd + (["--ckpt_path", "last"] if resume else [])


def env_for(tmp: Path) -> dict[str, str]:
    (tmp / "slow_callback.py").write_text(SLOW_CALLBACK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RERULE_DEBUG", None)
    return env


def run_to_end(cmd: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(cmd[-6:])} failed:\n{done.stderr[-4000:]}"


def step_of(path: Path) -> int:
    return int(path.stem.split("step=")[1]) if "step=" in path.stem else -1


def last_is_current(last: Path, newest: Path) -> bool:
    """Whether ``last.ckpt`` already holds the newest step checkpoint's state. The step file is written first and
    ``last.ckpt`` right after it, so a kill between the two left ``last.ckpt`` one checkpoint behind (a flaky
    failure on some machines): wait for both."""
    try:
        if last.is_symlink():
            return step_of(Path(os.readlink(last))) >= step_of(newest)
        return last.exists() and last.stat().st_mtime_ns >= newest.stat().st_mtime_ns
    except FileNotFoundError:  # replaced while we looked
        return False


def kill_in_hybrid_phase(cmd: list[str], env: dict[str, str], cwd: Path, ckpt_dir: Path) -> int:
    """Start ``cmd``; SIGKILL it as soon as a checkpoint at a step >= COLLECT exists. Returns that step."""
    log = cwd / "cut.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            paths = sorted(ckpt_dir.glob("*step=*.ckpt"), key=step_of) if ckpt_dir.exists() else []
            if paths and step_of(paths[-1]) >= COLLECT and last_is_current(ckpt_dir / "last.ckpt", paths[-1]):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return step_of(paths[-1])
            if proc.poll() is not None:
                pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.05)
        pytest.fail("no checkpoint in the hybrid phase appeared in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return -1


def val_metrics(log_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(log_dir / "run" / "version_0" / "metrics.csv")))
    out = {k: float(v) for r in rows for k, v in r.items() if v not in ("", None) and "/" in k
           and not k.startswith(("train/", "replay/"))}
    assert out, "no evaluation metrics were logged"
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), f"tensor {where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys of {where} differ: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length of {where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_sigkill_in_hybrid_phase_then_resume_equals_uninterrupted_run(tiny_prepared: dict, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    full_cmd = fit_command(tiny_prepared, tmp_path, "full")
    full_log = tmp_path / "full.log"
    with open(full_log, "w") as out:  # the uninterrupted run, alongside
        full_run = subprocess.Popen(full_cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        killed_at = kill_in_hybrid_phase(fit_command(tiny_prepared, tmp_path, "cut", slow=True), env, tmp_path,
                                         tmp_path / "cut" / "ckpt")
        last = validate_checkpoint(str(tmp_path / "cut" / "ckpt" / "last.ckpt"))
        assert COLLECT <= last["global_step"] < MAX_STEPS, (killed_at, last["global_step"])
        run_to_end(fit_command(tiny_prepared, tmp_path, "cut", resume=True), env, tmp_path)
        full_run.wait(timeout=TIMEOUT_S)
        assert full_run.returncode == 0, f"the uninterrupted run failed:\n{full_log.read_text()[-4000:]}"
    finally:
        if full_run.poll() is None:
            os.killpg(full_run.pid, signal.SIGKILL)
            full_run.wait(timeout=30)

    full = validate_checkpoint(str(tmp_path / "full" / "ckpt" / "last.ckpt"))
    resumed = validate_checkpoint(str(tmp_path / "cut" / "ckpt" / "last.ckpt"))
    assert full["global_step"] == resumed["global_step"] == MAX_STEPS
    assert_same(full["state_dict"], resumed["state_dict"], "state_dict")
    replay = [k for k in full["callbacks"] if k.startswith("HardCaseReplayCallback")]
    assert len(replay) == 1
    buffer = full["callbacks"][replay[0]]
    assert buffer["totals"]["admitted"] > 0 and buffer["totals"]["sampled"] > 0, "replay was never exercised"
    assert_same(buffer, resumed["callbacks"][replay[0]], "replay")
    assert_same(full["nonfinite"], resumed["nonfinite"], "nonfinite")
    assert val_metrics(tmp_path / "full" / "logs") == val_metrics(tmp_path / "cut" / "logs")


WRITER = '''
import sys, torch
from rerule_lightning.primitives.checkpointing import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
big = torch.arange(3_000_000, dtype=torch.float32)
i = 1
while True:
    io.save_checkpoint({"state_dict": {"w": big + i}, "pytorch-lightning_version": "2", "global_step": i}, path)
    i += 1
'''


def test_sigkill_during_checkpoint_writes_never_leaves_a_half_last(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "pytorch-lightning_version": "2",
                                          "global_step": 0}, last)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(last)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while validate_checkpoint(str(last))["global_step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.07)  # somewhere inside a later write
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    ckpt = validate_checkpoint(str(last))  # complete, whichever version it is
    step = ckpt["global_step"]
    assert step >= 2 and torch.equal(ckpt["state_dict"]["w"][:3], torch.tensor([0.0, 1.0, 2.0]) + step)
    AtomicCheckpointIO().save_checkpoint({**ckpt, "global_step": step + 1}, last)  # the next write cleans up
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
