"""Numeric init-argument ranges in the signatures (:mod:`rerule_lightning.primitives.ranges`), checked by
:mod:`rerule_lightning.cli.knobs` before instantiation and by the constructors themselves: hand-checked accept /
reject decisions and messages, the same verdict for YAML and flags, ranges inherited by subclasses, a range
that lives only in a signature still checked (no table behind it), and the range shown by ``--help``."""

import importlib
import inspect
import math
import re
import types
import typing
from typing import Annotated

import pytest

from rerule_lightning import GRPOUnlearningModule
from rerule_lightning.cli.knobs import KNOBS, knob_errors, rules_for
from rerule_lightning.primitives.ranges import Range, range_errors, range_of, ranges_of

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
    assert repr(rule) == text.removeprefix("must be ")  # what --help prints inside Annotated[...]


def test_a_range_is_found_inside_optional_and_a_reason_replaces_the_message() -> None:
    r = Range(1, integer=True)
    assert range_of(Annotated[int, r] | None) == r and range_of(Annotated[int | None, r]) == r
    assert range_of(int) is None and range_of(int | None) is None
    why = Range(2, integer=True, reason="GRPO needs at least 2 completions per prompt")
    assert repr(why) == ">= 2" and why.error("num_generations", 1) == \
        "num_generations=1: GRPO needs at least 2 completions per prompt"


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
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_top_k": -2}}
    assert knob_errors({"trainer": {"callbacks": [ckpt]}}) == [
        "--trainer.callbacks.init_args.save_top_k=-2: must be >= -1 (ModelCheckpoint)"]


def test_micro_batching_baselines_and_rejection_steering_knobs_are_checked() -> None:
    assert knob_errors(config(micro_batch_size=0, generation_batch_size=None)) == [
        "--model.init_args.micro_batch_size=0: must be null (off) or >= 1"]
    baseline = {"model": {"class_path": "rerule_lightning.LossUnlearningModule",
                          "init_args": {"beta": 0.0, "learning_rate": math.inf, "retain_weight": 1.0}},
                "data": {"class_path": "datamodules.PairedUnlearningDataModule", "init_args": {"batch_size": 0}}}
    assert sorted(knob_errors(baseline)) == ["--data.init_args.batch_size=0: must be >= 1",
                                             "--model.init_args.beta=0.0: must be finite and > 0",
                                             "--model.init_args.learning_rate=inf: must be finite and > 0"]
    rs = {"data": {"class_path": "datamodules.RejectionSteeringDataModule",
                   "init_args": {"min_refusals": 0, "benchmark": {"class_path": "datamodules.TOFUDataModule",
                                                                  "init_args": {"few_shot": -1}}}}}
    assert knob_errors(rs) == ["--data.init_args.min_refusals=0: must be >= 1",
                               "--data.init_args.benchmark.init_args.few_shot=-1: must be >= 0"]


def test_config_dataclass_arguments_are_checked_by_their_fields() -> None:
    sft = {"model": {"class_path": "rerule_lightning.SFTModule",
                     "init_args": {"policy": {"name_or_path": "m", "lora_dropout": 1.0}, "init": {"hidden_size": 0}}},
           "trainer": {"devices": 0}}
    assert knob_errors(sft) == [
        "--model.init_args.policy.lora_dropout=1.0: must be in [0, 1)",
        "--model.init_args.init.hidden_size=0: must be >= 1",
        "--trainer.devices=0: must be -1 (all), >= 1, a list of device ids or auto"]


class NarrowGRPO(GRPOUnlearningModule):
    """A user's subclass: one new ranged parameter (in no table), one parent range narrowed, the rest inherited."""

    def __init__(self, warmup_batches: Annotated[int, Range(0, 10, integer=True)] = 0,
                 epsilon_high: Annotated[float, Range(0, 1)] = 0.3, **kwargs: typing.Any) -> None:
        super().__init__(epsilon_high=epsilon_high, **kwargs)
        if errors := range_errors(NarrowGRPO, locals()):
            raise ValueError("; ".join(errors))


def test_a_subclass_inherits_its_parents_ranges_and_its_own_need_no_table() -> None:
    rules = rules_for("callbacks.HardCaseReplayCallback")
    assert rules["capacity"] == Range(1, integer=True) and "quantile" in rules
    assert "few_shot" in rules_for("datamodules.TOFUDataModule")  # from BenchmarkDataModule
    narrow = f"{__name__}.NarrowGRPO"
    assert "NarrowGRPO" not in KNOBS and "GRPOUnlearningModule" not in KNOBS
    cfg = {"model": {"class_path": narrow, "init_args": {"warmup_batches": 11, "epsilon_low": 1.5,
                                                         "epsilon_high": 2.0}}}
    assert knob_errors(cfg) == ["--model.init_args.epsilon_low=1.5: must be in [0, 1)",  # the parent's order first
                                "--model.init_args.epsilon_high=2.0: must be in [0, 1]",
                                "--model.init_args.warmup_batches=11: must be in [0, 10]"]
    assert knob_errors(config(epsilon_high=2.0)) == []  # the parent's own range is unchanged
    with pytest.raises(ValueError, match=r"^GRPOUnlearningModule: epsilon_low=1\.5: must be in \[0, 1\)$"):
        NarrowGRPO(epsilon_low=1.5)  # from Python too, through the parent's constructor
    with pytest.raises(ValueError, match=r"^warmup_batches=11: must be in \[0, 10\]$"):
        NarrowGRPO(warmup_batches=11)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: GRPOUnlearningModule(num_generations=1, top_p=0.0),
     "GRPOUnlearningModule: num_generations=1: GRPO needs at least 2 completions per prompt; top_p=0.0: must be "
     "in (0, 1]"),
    (lambda: importlib.import_module("rerule_lightning").PolicyConfig(lora_r=0, lora_dropout=1.0),
     "policy.lora_r=0: must be >= 1; policy.lora_dropout=1.0: must be in [0, 1)"),
    (lambda: importlib.import_module("callbacks").HardCaseReplayCallback(quantile=1.0, is_cap=math.nan),
     "HardCaseReplayCallback: quantile=1.0: must be in (0, 1); is_cap=nan: must be finite and > 0"),
    (lambda: importlib.import_module("datamodules").ForgetRetainDataModule(eval_max_items=0),
     "data.eval_max_items=0: must be null (off) or >= 1"),
])
def test_constructors_refuse_values_outside_their_annotated_range(build: typing.Callable, message: str) -> None:
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == message


def _project_classes() -> list[type]:
    out = []
    for module in ("rerule_lightning", "callbacks", "datamodules", "datamodules.benchmarks"):
        mod = importlib.import_module(module)
        out += [v for k in dir(mod) if isinstance(v := getattr(mod, k), type) and v.__module__.split(".")[0] in
                ("rerule_lightning", "callbacks", "datamodules")]
    return list(dict.fromkeys(out))


#: Numeric parameters that are free on purpose (any integer is a valid seed).
_FREE = {"seed"}


def _is_number(hint: typing.Any) -> bool:
    if typing.get_origin(hint) is Annotated:
        hint = hint.__origin__
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return bool(args) and all(_is_number(a) for a in args)
    return hint in (int, float)


def test_every_numeric_init_argument_of_the_lightning_classes_has_a_range() -> None:
    import lightning as L

    from callbacks import ReplayCallback  # a shared base: its concrete callbacks carry the ranges
    from rerule_lightning.primitives.ranges import hints_of

    kinds = (L.LightningModule, L.LightningDataModule, L.Callback)
    for cls in _project_classes():  # hints that fail to resolve would hide ranges: every parameter has one
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
        assert params <= set(hints_of(cls)), f"{cls.__name__}: unresolved hints {sorted(params - set(hints_of(cls)))}"
    missing = [f"{cls.__name__}.{name}" for cls in _project_classes() if issubclass(cls, kinds)
               and cls is not ReplayCallback
               for name, hint in hints_of(cls).items()
               if name in inspect.signature(cls.__init__).parameters and name not in _FREE and _is_number(hint)
               and name not in ranges_of(cls)]
    assert not missing, f"numeric init arguments without a Range: {missing}"


def test_only_classes_the_project_does_not_own_keep_a_table() -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert set(KNOBS) == {"Trainer", "ModelCheckpoint"}
    for cls in (L.Trainer, ModelCheckpoint):
        params = inspect.signature(cls.__init__).parameters
        assert set(KNOBS[cls.__name__]) <= set(params), sorted(set(KNOBS[cls.__name__]) - set(params))


def test_help_shows_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    from rerule_lightning.cli.commands import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "configs/embedded/rule.yaml", "--model.help", "GRPOUnlearningModule"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert re.search(r"--model\.epsilon_low EPSILON_LOW Lower clip range ε_low\. "
                     r"\(type: Annotated\[float, in \[0, 1\)\], default: 0\.2\)", text), text
    assert "(type: Optional[Annotated[int, null (off) or >= 1]], default: null)" in text  # micro_batch_size


def test_yaml_and_flags_get_the_same_verdict(tmp_path, one_torch_thread, no_weight_loading) -> None:
    from rerule_lightning.cli.lightning_cli import ConfigError, lightning_main

    (tmp_path / "bad.yaml").write_text("model:\n  init_args:\n    temperature: .inf\n")
    base = ["fit", "--config", "configs/embedded/rule.yaml"]
    with pytest.raises(ConfigError) as from_yaml:
        lightning_main(base + ["--config", str(tmp_path / "bad.yaml")], run=False)
    with pytest.raises(ConfigError) as from_flag:
        lightning_main(base + ["--model.init_args.temperature", ".inf"], run=False)
    assert str(from_yaml.value) == str(from_flag.value) == "--model.init_args.temperature=inf: must be finite and > 0"
