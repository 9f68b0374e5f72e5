"""Resumable real configs: every real-benchmark stage includes ``configs/checkpointing.yaml``
(:class:`callbacks.ResumableCheckpoint`: every N steps, last.ckpt, one more on SIGTERM, an export each time). A
TOFU-shaped ``rerule fit`` (configs/tofu/rule.yaml on the TOFU fixture with a tiny chat model) stopped by SIGTERM
leaves a checkpoint and a usable export; resumed with ``--ckpt_path last`` it ends with exactly the weights of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rerule_lightning.primitives.checkpointing import validate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FIXTURE = ROOT / "tests" / "fixtures" / "tofu"
REAL_STAGES = sorted([*(CONFIGS / b / f"{s}.yaml" for b in ("tofu", "muse_books", "muse_news", "rwku")
                        for s in ("rs", "rule")),
                      *(CONFIGS / "baselines" / f"{b}_npo.yaml" for b in ("tofu", "muse_books", "muse_news"))])
MAX_STEPS, EVERY = 6, 2
TIMEOUT_S = 240

SLOW_CALLBACK = '''
import time
import lightning as L


class Slow(L.Callback):
    """Leaves time to signal the run between two steps (sleeping changes no result)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.4)
'''


@pytest.mark.parametrize("path", REAL_STAGES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_real_stage_includes_the_checkpoint_overlay(path: Path, no_weight_loading: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from rerule_lightning.cli.commands import lightning_main

    trainer = yaml.safe_load(path.read_text())["trainer"]
    assert trainer["enable_checkpointing"] is True and trainer["callbacks"] == "../checkpointing.yaml"
    monkeypatch.chdir(tmp_path)
    cli = lightning_main(["fit", "--config", str(path), "--trainer.logger", "false"], run=False)
    ckpt = [c for c in cli.trainer.callbacks if type(c).__name__ == "ResumableCheckpoint"]
    assert len(ckpt) == 1 and ckpt[0]._every_n_train_steps == 25 and ckpt[0].save_last and ckpt[0].export
    # replay overlays append to the list
    with_replay = lightning_main(["fit", "--config", str(path), "--config", str(CONFIGS / "replay" / "hard_case.yaml"),
                                  "--trainer.logger", "false"], run=False) if "rule" in path.name else None
    if with_replay is not None:
        names = {type(c).__name__ for c in with_replay.trainer.callbacks}
        assert {"ResumableCheckpoint", "HardCaseReplayCallback"} <= names


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A TRL-style reward with variance in every group at temperature 2, so the adapters get a policy gradient in a
    few steps (with both log-prob passes sharing the prompt encoding, the KL term alone is exactly 0 at the start,
    and the TOFU reward can give all-equal groups on the tiny model)."""
    return [float(len(c)) for c in completions]


def _command(model: str, tmp: Path, name: str, slow: bool) -> list[str]:
    extra = tmp / f"{name}.yaml"
    slow_cb = "    - class_path: slow_callback.Slow\n" if slow else ""
    extra.write_text(textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: callbacks.ResumableCheckpoint
              init_args: {{every_n_train_steps: {EVERY}}}
        """) + slow_cb)
    return [sys.executable, "-m", "rerule_lightning.cli", "fit", "--config", str(CONFIGS / "tofu" / "rule.yaml"),
            "--config", str(CONFIGS / "peft" / "lora.yaml"),
            "--config", str(extra),
            "--model.init_args.policy.name_or_path", model, "--model.init_args.policy.dtype", "float32",
            "--model.init_args.policy.gradient_checkpointing", "false", "--model.init_args.micro_batch_size", "null",
            "--model.init_args.max_new_tokens", "6", "--model.init_args.num_generations", "2",
            "--model.init_args.temperature", "2.0", "--model.init_args.learning_rate", "0.01",
            "--model.init_args.reward", "test_checkpointing_overlay:length_reward",
            "--model.init_args.eval_reference", "null", "--model.init_args.export_dir", str(tmp / name / "export"),
            "--data.init_args.source", str(FIXTURE), "--data.init_args.tokenizer", model,
            "--data.init_args.rows_per_author", "3", "--data.init_args.batch_size", "2",
            "--trainer.max_steps", str(MAX_STEPS), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp / name)]


def _env(tmp: Path) -> dict[str, str]:
    (tmp / "slow_callback.py").write_text(SLOW_CALLBACK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RERULE_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("RERULE_DEBUG", None)
    return env


def _adapter(export: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigterm_leaves_checkpoint_and_export_and_resume_matches_uninterrupted(tiny_chat_model: str, tmp_path: Path,
                                                                               one_torch_thread: None,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from rerule_lightning.cli.commands import main

    env = _env(tmp_path)
    assert main(_command(tiny_chat_model, tmp_path, "full", slow=False)[3:]) == 0  # in-process: the reference run
    first = tmp_path / "cut" / "checkpoints" / "step000002.ckpt"
    log = tmp_path / "cut.err"
    with open(log, "w") as err:
        proc = subprocess.Popen(_command(tiny_chat_model, tmp_path, "cut", slow=True), env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not first.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint before the run ended ({proc.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    err = log.read_text()
    assert status == 143, err[-3000:]
    m = re.search(r"rerule: stopped by SIGTERM at step (\d+): last checkpoint (\S+) ", err)
    assert m, err[-3000:]
    stopped = int(m.group(1))
    assert 2 <= stopped < MAX_STEPS
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert validate_checkpoint(str(last))["global_step"] == stopped  # the SIGTERM checkpoint, not step 2's
    # the interrupted run left a usable export of the step it stopped at
    export = tmp_path / "cut" / "export"
    card = json.loads((export / "rerule_export.json").read_text())
    assert card["final"] is False and card["step"] == stopped
    assert "checkpoint export" in (export / "README.md").read_text()
    # resume from last: exactly the uninterrupted run's adapters
    assert main(_command(tiny_chat_model, tmp_path, "cut", slow=False)[3:] + ["--ckpt_path", "last"]) == 0
    a, b = _adapter(tmp_path / "full" / "export"), _adapter(export)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((export / "rerule_export.json").read_text())["final"] is True
    start = _adapter(tmp_path / "cut" / "export")  # sanity: training moved the adapters away from init (B = 0)
    assert any(float(v.abs().max()) > 0 for k, v in start.items() if "lora_B" in k)
