"""The declarative table of numeric init-argument ranges (:mod:`rerule_lightning.cli.knobs`): hand-checked
accept / reject decisions and messages, the same verdict for YAML and flags, and a table that names only real
classes and parameters."""

from __future__ import annotations

import importlib
import inspect
import math

import pytest

from rerule_lightning.cli.knobs import KNOBS, Range, knob_errors, rules_for

GRPO = "rerule_lightning.GRPOUnlearningModule"


@pytest.mark.parametrize(("rule", "good", "bad", "text"), [
    (Range(0, 1, hi_open=True), [0, 0.0, 0.999], [1, 1.0, -0.1, math.nan, math.inf, True, "0.5"],
     "must be in [0, 1)"),
    (Range(0, lo_open=True), [1e-9, 3], [0, 0.0, -1, math.nan, math.inf], "must be finite and > 0"),
    (Range(1, lo_open=True, special=((None, "off"),)), [None, 1.0001, 3.0], [1, 0.5, math.inf],
     "must be null (off) or finite and > 1"),
    (Range(1, integer=True, special=((-1, "no limit"),)), [-1, 1, 60], [0, -5, -2, 1.5, None],
     "must be -1 (no limit) or >= 1"),
])
def test_range_accepts_exactly_its_interval(rule: Range, good: list, bad: list, text: str) -> None:
    assert all(rule.accepts(v) for v in good), [v for v in good if not rule.accepts(v)]
    assert not any(rule.accepts(v) for v in bad), [v for v in bad if rule.accepts(v)]
    assert rule.describe() == text


def config(**init_args: object) -> dict:
    return {"model": {"class_path": GRPO, "init_args": init_args}, "trainer": {"max_steps": 60}}


def test_the_messages_name_the_flag_the_value_and_the_range() -> None:
    assert knob_errors(config(epsilon_low=0.2, epsilon_high=0.3, beta=0.01, dual_clip=None)) == []
    assert knob_errors(config(epsilon_low=1.5, beta=math.nan, dual_clip=0.5)) == [
        "--model.init_args.beta=nan: must be finite and >= 0",
        "--model.init_args.epsilon_low=1.5: must be in [0, 1)",
        "--model.init_args.dual_clip=0.5: must be null (off) or finite and > 1"]
    cb = {"class_path": "callbacks.HardCaseReplayCallback", "init_args": {"reward_threshold": {"forget": 2.0}}}
    assert knob_errors({"trainer": {"max_steps": -5, "callbacks": [cb]}}) == [
        "--trainer.max_steps=-5: must be -1 (no limit) or >= 1",
        "--trainer.callbacks.init_args.reward_threshold.forget=2.0: must be null (off) or in [0, 1] "
        "(HardCaseReplayCallback)"]


def test_micro_batching_baselines_and_rejection_steering_knobs_are_in_the_table() -> None:
    assert knob_errors(config(micro_batch_size=0, generation_batch_size=None)) == [
        "--model.init_args.micro_batch_size=0: must be null (off) or >= 1"]
    baseline = {"model": {"class_path": "rerule_lightning.LossUnlearningModule",
                          "init_args": {"beta": 0.0, "learning_rate": math.inf, "retain_weight": 1.0}},
                "data": {"class_path": "datamodules.PairedUnlearningDataModule", "init_args": {"batch_size": 0}}}
    assert sorted(knob_errors(baseline)) == ["--data.init_args.batch_size=0: must be >= 1",
                                             "--model.init_args.beta=0.0: must be finite and > 0",
                                             "--model.init_args.learning_rate=inf: must be finite and > 0"]


def test_nested_config_dataclasses_and_trainer_devices() -> None:
    cfg = config(policy={"name_or_path": "m", "lora_dropout": 1.0}, init={"hidden_size": 0})
    cfg["trainer"]["devices"] = 0
    assert knob_errors(cfg) == [
        "--model.init_args.policy.lora_dropout=1.0: must be in [0, 1)",
        "--model.init_args.init.hidden_size=0: must be >= 1",
        "--trainer.devices=0: must be -1 (all), >= 1, a list of device ids or auto"]


def test_a_subclass_is_checked_as_its_parent() -> None:
    rules = rules_for("callbacks.HardCaseReplayCallback")
    assert rules["capacity"] == KNOBS["ReplayCallback"]["capacity"] and "quantile" in rules
    assert "few_shot" in rules_for("datamodules.TOFUDataModule")  # from BenchmarkDataModule


def _class(name: str) -> type:
    if name == "Trainer":
        import lightning as L
        return L.Trainer
    if name == "PolicyConfig":
        from rerule_lightning.primitives.policy import PolicyConfig
        return PolicyConfig
    if name == "ModelCheckpoint":
        from lightning.pytorch.callbacks import ModelCheckpoint
        return ModelCheckpoint
    for module in ("rerule_lightning", "callbacks", "datamodules", "rerule_lightning.modules.sft", "callbacks.replay",
                   "datamodules.benchmarks"):
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise AssertionError(f"KNOBS names {name}, which is no class of the project")


def test_the_table_names_real_parameters() -> None:
    for name, rules in KNOBS.items():
        params = inspect.signature(_class(name).__init__).parameters
        assert set(rules) <= set(params), f"{name}: not parameters: {sorted(set(rules) - set(params))}"


def test_yaml_and_flags_get_the_same_verdict(tmp_path, one_torch_thread, no_weight_loading) -> None:
    from rerule_lightning.cli.lightning_cli import ConfigError, lightning_main

    (tmp_path / "bad.yaml").write_text("model:\n  init_args:\n    temperature: .inf\n")
    base = ["fit", "--config", "configs/embedded/rule.yaml"]
    with pytest.raises(ConfigError) as from_yaml:
        lightning_main(base + ["--config", str(tmp_path / "bad.yaml")], run=False)
    with pytest.raises(ConfigError) as from_flag:
        lightning_main(base + ["--model.init_args.temperature", ".inf"], run=False)
    assert str(from_yaml.value) == str(from_flag.value) == "--model.init_args.temperature=inf: must be finite and > 0"
