"""Bad input beyond the first table (issue 18): nonsense numbers, broken model directories, unwritable outputs and
tracking stores, YAML that repeats a key, an overlay that would do nothing, and main-job / report sanity. Every
case goes through ``rerule`` in-process and is checked like the first table (:func:`test_bad_input.
check_fails_early`): exit status 2, one ``rerule: error:`` line naming the flag / file and the allowed range or
choices, no traceback, nothing left behind (no export dir, checkpoint, eval.json, config.yaml) and no MLflow run,
hence no training step: the run is created when Lightning starts, after every check."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_bad_input import HARD_CASE, Env, check_fails_early, flags, yaml_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_copy(edit: Callable[[Path], None], flag: str = "--model.init_args.policy.name_or_path"
               ) -> Callable[[Env], list[str]]:
    """A copy of the tiny target model directory, edited."""
    def build(env: Env) -> list[str]:
        out = env.tmp / "model"
        shutil.copytree(env.target, out)
        edit(out)
        return [flag, str(out)]
    return build


def _truncate_weights(d: Path) -> None:
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _empty(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()


def _small_vocab(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))


def existing_file(flag: str, sub: str = "") -> Callable[[Env], list[str]]:
    """``flag`` pointing at an existing file (or at a path below one, with ``sub``)."""
    def build(env: Env) -> list[str]:
        p = env.tmp / "a_file"
        p.write_text("not a directory")
        return [flag, str(p / sub) if sub else str(p)]
    return build


def existing_dir(flag: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        (env.tmp / "a_dir").mkdir()
        return [flag, str(env.tmp / "a_dir")]
    return build


def checkpoint_dir_is_file(env: Env) -> list[str]:
    p = env.tmp / "a_file"
    p.write_text("not a directory")
    overlay = env.tmp / "ckpt.yaml"
    overlay.write_text(f"trainer:\n  enable_checkpointing: true\n  callbacks:\n"
                       f"    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                       f"      init_args: {{dirpath: {p}}}\n")
    return ["--config", str(overlay)]


def report_store(env: Env) -> list[str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{env.tmp / 'report.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("exp")).info.run_id
    client.log_metric(run, "forget/refusal_rate", 1.0)
    client.log_metric(run, "retain/answer_accuracy", 0.5)
    client.set_terminated(run)
    return ["--tracking_uri", uri, "--experiment", "exp", "--pareto_x", "unknown_metric"]


GPU = "mps" if torch.cuda.is_available() else "gpu"  # a device this machine lacks

#: (id, command, input builder, pattern the error line must contain)
CASES: list[tuple[str, str, Callable[[Env], list[str]], str]] = [
    # numeric knobs: flags and YAML, ranges in the signatures (rerule_lightning.primitives.ranges)
    ("knob_epsilon_high_negative", "fit", flags("--model.init_args.epsilon_high", "-1"),
     r"--model\.init_args\.epsilon_high=-1\.0: must be finite and >= 0$"),
    ("knob_epsilon_low_above_1", "fit", flags("--model.init_args.epsilon_low", "1.5"),
     r"--model\.init_args\.epsilon_low=1\.5: must be in \[0, 1\)$"),
    ("knob_recall_threshold_2", "fit", flags("--model.init_args.recall_threshold", "2"),
     r"--model\.init_args\.recall_threshold=2\.0: must be in \[0, 1\]$"),
    ("knob_max_grad_norm_negative", "fit", flags("--model.init_args.max_grad_norm", "-1"),
     r"--model\.init_args\.max_grad_norm=-1\.0: must be finite and >= 0$"),
    ("knob_dual_clip_below_1", "fit", flags("--model.init_args.dual_clip", "0.5"),
     r"--model\.init_args\.dual_clip=0\.5: must be null \(off\) or finite and > 1$"),
    ("knob_yaml_temperature_inf", "fit", yaml_file("model:\n  init_args:\n    temperature: .inf\n"),
     r"--model\.init_args\.temperature=inf: must be finite and > 0$"),
    ("knob_yaml_beta_nan", "fit", yaml_file("model:\n  init_args:\n    beta: .nan\n"),
     r"--model\.init_args\.beta=nan: must be finite and >= 0$"),
    ("knob_yaml_learning_rate_nan", "fit", yaml_file("model:\n  init_args:\n    learning_rate: .nan\n"),
     r"--model\.init_args\.learning_rate=nan: must be finite and > 0$"),
    ("knob_yaml_callback_threshold", "fit",
     yaml_file(HARD_CASE.read_text().replace("reward_threshold: null", "reward_threshold: {forget: 2}")),
     r"--trainer\.callbacks\.init_args\.reward_threshold\.forget=2\.0: must be null \(off\) or in \[0, 1\] "
     r"\(HardCaseReplayCallback\)$"),
    ("knob_max_steps_negative", "fit", flags("--trainer.max_steps", "-5"),
     r"--trainer\.max_steps=-5: must be -1 \(no limit\) or >= 1$"),
    ("knob_max_time_garbage", "fit", flags("--trainer.max_time", "abc"),
     r"--trainer\.max_time=abc: expected DD:HH:MM:SS"),
    ("knob_accelerator_missing", "fit", flags("--trainer.accelerator", GPU),
     rf"--trainer\.accelerator={GPU}: no such device on this machine"),
    ("knob_prepare_hidden_size_0", "prepare-tiny", flags("--model.hidden_size", "0"),
     r"model\.hidden_size=0: must be >= 1$"),
    ("knob_prepare_learning_rate_nan", "prepare", yaml_file("target_training:\n  learning_rate: .nan\n"),
     r"target_training\.learning_rate=nan: must be finite and > 0$"),
    ("knob_prepare_context_too_small", "prepare-tiny", flags("--model.max_position_embeddings", "8"),
     r"--model\.max_position_embeddings=8: the world's longest training example has \d+ tokens"),
    # model directories
    ("model_truncated_weights", "fit", model_copy(_truncate_weights),
     r"--model\.init_args\.policy\.name_or_path='[^']+/model': \S+/model\.safetensors is truncated"),
    ("model_invalid_config_json", "fit", model_copy(lambda d: (d / "config.json").write_text("{bad")),
     r"--model\.init_args\.policy\.name_or_path='[^']+': \S+/config\.json is not valid JSON \(line 1"),
    ("model_empty_dir", "fit", model_copy(_empty),
     r"--model\.init_args\.policy\.name_or_path='[^']+': no config\.json, not a model directory \(empty\)"),
    ("model_tokenizer_beyond_vocab", "fit", model_copy(_small_vocab),
     r"--model\.init_args\.policy\.name_or_path='[^']+': the tokenizer has \d+ tokens but the model's vocabulary "
     r"\(--model\.init_args\.policy\.name_or_path\) has 100"),
    ("model_reference_missing", "fit", flags("--model.init_args.reference_path", "/nonexistent/ref"),
     r"--model\.init_args\.reference_path='/nonexistent/ref': directory not found"),
    ("model_eval_reference_truncated", "fit", model_copy(_truncate_weights, "--model.init_args.eval_reference"),
     r"--model\.init_args\.eval_reference='[^']+': \S+/model\.safetensors is truncated"),
    # outputs
    ("out_export_dir_is_file", "fit", existing_file("--model.init_args.export_dir"),
     r"--model\.init_args\.export_dir='[^']+a_file': is an existing file, expected a directory"),
    ("out_eval_report_is_dir", "test", existing_dir("--model.init_args.eval_report_path"),
     r"--model\.init_args\.eval_report_path='[^']+a_dir': is a directory, expected a file path"),
    ("out_root_dir_is_file", "fit", existing_file("--trainer.default_root_dir"),
     r"--trainer\.default_root_dir='[^']+a_file': is an existing file"),
    ("out_root_dir_uncreatable", "fit", existing_file("--trainer.default_root_dir", "logs"),
     r"--trainer\.default_root_dir='[^']+a_file/logs': cannot be created: \S+a_file is a file"),
    ("out_checkpoint_dir_is_file", "fit", checkpoint_dir_is_file,
     r"--trainer\.callbacks\.init_args\.dirpath \(ModelCheckpoint\)='[^']+a_file': is an existing file"),
    ("out_sqlite_dir_missing", "fit",
     flags("--trainer.logger.init_args.tracking_uri", "sqlite:////nonexistent/rerule-dir/x.db"),
     r"tracking_uri=sqlite:////nonexistent/rerule-dir/x\.db: the database's directory /nonexistent/rerule-dir "
     r"does not exist"),
    ("out_sqlite_unwritable", "fit", flags("--trainer.logger.init_args.tracking_uri", "sqlite:////proc/x.db"),
     r"tracking_uri=sqlite:////proc/x\.db: the database cannot be created: /proc is not writable"),
    # YAML strictness
    ("yaml_duplicate_key", "fit", yaml_file("model:\n  init_args:\n    beta: 0.1\n    beta: 0.2\n"),
     r"--config \S+bad\.yaml: line 4: duplicate key 'model\.init_args\.beta' \(first at line 3\)"),
    ("yaml_duplicate_block", "fit", yaml_file("trainer:\n  max_steps: 2\nmodel:\n  init_args:\n    beta: 0.1\n"
                                              "trainer:\n  log_every_n_steps: 1\n"),
     r"--config \S+bad\.yaml: line 6: duplicate key 'trainer' \(first at line 1\)"),
    ("yaml_duplicate_key_prepare", "prepare", yaml_file("world:\n  seed: 1\nworld:\n  seed: 2\n"),
     r"--config \S+bad\.yaml: line 3: duplicate key 'world' \(first at line 1\)"),
    ("yaml_replay_on_sft", "fit-rs", flags("--config", str(HARD_CASE)),
     r"--trainer\.callbacks: HardCaseReplayCallback acts on a GRPOUnlearningModule's rollouts, but the model is "
     r"SFTModule: it would do nothing"),
    # the main job and the report
    ("demo_rule_steps_0", "demo", flags("--rule_steps", "0"), r"--rule_steps=0: must be >= 1"),
    ("report_unknown_metric", "report", report_store,
     r"--pareto_x=unknown_metric: no selected run logged this metric; choose from: forget/refusal_rate, "
     r"retain/answer_accuracy$"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_more_bad_input_fails_early_naming_the_culprit(case: tuple, tiny_prepared: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    line = check_fails_early(case, tiny_prepared, tmp_path / "unused.ckpt", tmp_path, capsys, monkeypatch)
    assert line.startswith("rerule: error: ") and re.search(case[3], line), line
    assert not Path("/nonexistent/rerule-dir").exists()  # no directories created outside the project
    assert not (tmp_path / "out" / "report").exists()


def test_every_class_of_issue_18_has_a_case() -> None:
    kinds = {c[0].split("_")[0] for c in CASES}
    assert {"knob", "model", "out", "yaml", "demo", "report"} <= kinds
    assert len(CASES) >= 25
