"""One declarative table of the allowed range of every numeric init argument, checked before instantiation.

:data:`KNOBS` maps a class name (a module, callback, DataModule, config dataclass, or ``Trainer``) to its
numeric parameters and their :class:`Range`. :func:`knob_errors` walks a parsed ``rerule fit | validate | test``
config (YAML files and flags already merged, so both are checked the same way) and returns one message per
out-of-range value, naming its flag and the allowed range, e.g.
``--model.init_args.epsilon_low=1.5: must be in [0, 1)``. A class matches through its MRO, so a user's
subclass of :class:`~rerule_lightning.GRPOUnlearningModule` is checked as its parent; parameters a class does
not have are ignored. Every float range also requires a finite value unless it says otherwise (``nan`` and
``inf`` fail: ``nan > 0`` is false, so a plain comparison would let ``beta: .nan`` switch the KL off).

Constructors keep their own checks (they also run outside the CLI); this table is what makes the CLI fail
before any class is built, with the flag's full name.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """An allowed interval, plus special values that are always accepted (``None``, ``-1`` = no limit ...).

    Args:
        lo: Lower bound (``None``: unbounded).
        hi: Upper bound (``None``: unbounded).
        lo_open: Whether ``lo`` itself is excluded.
        hi_open: Whether ``hi`` itself is excluded.
        integer: Whether the value must be an integer.
        special: Values accepted outside the interval, with what they mean (shown in the message).
        reason: The message instead of the range (e.g. why the bound exists).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    special: tuple[tuple[Any, str], ...] = ()
    reason: str | None = None

    def describe(self) -> str:
        """``in [0, 1)``, ``> 0``, ``>= 1``, ... with the special values first."""
        if self.lo is not None and self.hi is not None:
            core = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            core = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            core = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            core = "finite"
        if self.reason:
            return self.reason
        # an int is typed by jsonargparse; a bounded interval excludes nan and inf by itself
        kind = "" if self.integer or core == "finite" or (self.lo is not None and self.hi is not None) else \
            "finite and "
        extra = "".join(f"{_num(v) if v is not None else 'null'} ({what}) or " for v, what in self.special)
        return f"must be {extra}{kind}{core}"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed (``bool`` is never a number here)."""
        if any(value == v and type(value) is type(v) or (value is None and v is None) for v, _ in self.special):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))


def _num(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


NULL = ((None, "off"),)
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)
COUNT_OR_NULL = Range(1, integer=True, special=NULL)
FRACTION_OPEN = Range(0, 1, lo_open=True, hi_open=True)
#: Rewards are in [0, 1] ({0, 0.5, 1} for the RULE rewards), and ROUGE recall too.
REWARD = Range(0, 1)
#: ``collect_steps`` / ``replay_start``: a step count (int >= 0) or a fraction of ``max_steps`` (float in [0, 1]).
SCHEDULE = Range(0, special=NULL + (("adaptive", "from the zero-variance fraction"),))

def _without(rules: dict[str, Range], *names: str) -> dict[str, Range]:
    return {k: v for k, v in rules.items() if k not in names}


_REPLAY_COMMON = {
    "window": COUNT, "prompt_momentum": Range(0, 1, hi_open=True), "collect_steps": SCHEDULE,
    "replay_start": SCHEDULE, "adaptive_threshold": Range(0, 1, lo_open=True), "replay_groups": COUNT_OR_NULL,
    "capacity": COUNT, "max_replays": COUNT, "max_age": COUNT_OR_NULL, "advantage_std_floor": POSITIVE,
}
_GROUP_REPLAY = {**_REPLAY_COMMON, "is_cap": POSITIVE, "replay_loss_weight": NON_NEGATIVE}
_HARDNESS = {"margin": NON_NEGATIVE, "quantile": FRACTION_OPEN, "reward_threshold": Range(0, 1, special=NULL),
             "priority_exponent": NON_NEGATIVE, "replay_penalty": NON_NEGATIVE}
_PROMPT_DATA = {"batch_size": COUNT, "forget_fraction": FRACTION_OPEN, "epoch_length": COUNT,
                "eval_max_items": COUNT_OR_NULL, "eval_batch_size": COUNT}
_SFT_DATA = {"refusal_fraction": Range(0, 1, lo_open=True), "retain_anchor_ratio": NON_NEGATIVE,
             "batch_size": COUNT, "max_length": COUNT}

#: class name -> parameter -> allowed range. The same table for YAML and flags (see the module docstring).
KNOBS: dict[str, dict[str, Range]] = {
    "GRPOUnlearningModule": {
        "num_generations": Range(2, integer=True, reason="GRPO needs at least 2 completions per prompt"),
        "max_new_tokens": COUNT, "temperature": POSITIVE,
        "top_p": Range(0, 1, lo_open=True), "learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE,
        "max_grad_norm": NON_NEGATIVE, "num_iterations": COUNT,  # max_grad_norm 0: no clipping
        "beta": NON_NEGATIVE, "epsilon_low": Range(0, 1, hi_open=True),
        "epsilon_high": NON_NEGATIVE, "dual_clip": Range(1, lo_open=True, special=NULL),
        "recall_threshold": REWARD, "eval_max_new_tokens": COUNT, "max_consecutive_nonfinite": COUNT,
        "micro_batch_size": COUNT_OR_NULL, "generation_batch_size": COUNT_OR_NULL,
    },
    "LossUnlearningModule": {
        "learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_steps": Range(0, integer=True),
        "max_grad_norm": NON_NEGATIVE, "forget_weight": NON_NEGATIVE, "retain_weight": NON_NEGATIVE,
        "beta": POSITIVE, "simnpo_gamma": Range(), "rmu_layer": Range(0, integer=True),
        "rmu_steering_coeff": POSITIVE, "max_length": Range(2, integer=True), "eval_max_new_tokens": COUNT,
        "max_consecutive_nonfinite": COUNT,
    },
    "PairedUnlearningDataModule": {"batch_size": COUNT},
    "SFTModule": {"learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_steps": Range(0, integer=True)},
    "EvalModule": {"eval_max_new_tokens": COUNT},
    "PolicyConfig": {"lora_r": COUNT, "lora_alpha": POSITIVE, "lora_dropout": Range(0, 1, hi_open=True)},
    "TinyLlamaConfig": {"hidden_size": COUNT, "num_hidden_layers": COUNT, "num_attention_heads": COUNT,
                        "intermediate_size": COUNT, "max_position_embeddings": COUNT},
    "ReplayCallback": _REPLAY_COMMON,
    "HardCaseReplayCallback": {**_GROUP_REPLAY, **_HARDNESS},
    "RandomReplayCallback": _without(_GROUP_REPLAY, "prompt_momentum"),
    "PromptReplayCallback": _without({**_REPLAY_COMMON, **_HARDNESS}, "advantage_std_floor"),
    "ForgetRetainDataModule": _PROMPT_DATA,
    "BenchmarkDataModule": {**_PROMPT_DATA, "few_shot": Range(0, integer=True)},
    "EmbeddedSFTDataModule": _SFT_DATA,
    "RejectionSteeringDataModule": {**_SFT_DATA, "min_refusals": COUNT},
    "ResumableCheckpoint": {"every_n_train_steps": COUNT, "save_top_k": Range(-1, integer=True)},
    "CompletionsTable": {"every_n_steps": Range(0, integer=True), "num_groups": Range(0, integer=True),
                         "num_eval_items": Range(0, integer=True), "max_chars": COUNT},
    "ModelCheckpoint": {"every_n_train_steps": Range(0, integer=True, special=NULL),
                        "save_top_k": Range(-1, integer=True), "every_n_epochs": Range(0, integer=True, special=NULL)},
    "Trainer": {
        "max_steps": Range(1, integer=True, special=((-1, "no limit"),)),
        "max_epochs": Range(1, integer=True, special=NULL + ((-1, "no limit"),)),
        "min_steps": Range(0, integer=True, special=NULL), "min_epochs": Range(0, integer=True, special=NULL),
        "log_every_n_steps": COUNT_OR_NULL, "accumulate_grad_batches": COUNT,
        "gradient_clip_val": Range(0, special=NULL), "num_sanity_val_steps": Range(-1, integer=True, special=NULL),
        "check_val_every_n_epoch": COUNT_OR_NULL, "val_check_interval": Range(0, lo_open=True, special=NULL),
        **{f"limit_{s}_batches": Range(0, special=NULL) for s in ("train", "val", "test", "predict")},
    },
}

#: Init arguments that are config dataclasses (no ``class_path``) -> their entry in :data:`KNOBS`.
NESTED = {"policy": "PolicyConfig", "init": "TinyLlamaConfig"}

_MAX_TIME = re.compile(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}")


def rules_for(class_path: str) -> dict[str, Range]:
    """The ranges of a class: its own and its bases' entries in :data:`KNOBS` (nearest class wins)."""
    out: dict[str, Range] = {}
    for n in reversed(mro_names(class_path)):  # an unknown class: jsonargparse reports it
        out.update(KNOBS.get(n, {}))
    return out


def _as_dict(node: Any) -> Any:
    return node.as_dict() if hasattr(node, "as_dict") else node


def _components(node: Any, prefix: str) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """``(flag prefix, class_path, init_args)`` of every ``class_path`` component under ``node``."""
    node = _as_dict(node)
    if isinstance(node, Mapping):
        if node.get("class_path"):
            args = _as_dict(node.get("init_args")) or {}
            yield f"{prefix}.init_args", str(node["class_path"]), args
            for k, v in args.items():
                yield from _components(v, f"{prefix}.init_args.{k}")
        else:
            for k, v in node.items():
                yield from _components(v, f"{prefix}.{k}")
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _components(v, prefix)


def _check(flag: str, value: Any, rule: Range, owner: str | None) -> str | None:
    values = value.items() if isinstance(value, Mapping) else [(None, value)]  # reward_threshold per label
    for key, v in values:
        if not rule.accepts(v):
            where = f"{flag}.{key}" if key is not None else flag
            return f"{where}={v}: {rule.describe()}" + (f" ({owner})" if owner else "")
    return None


def knob_errors(config: Any) -> list[str]:
    """Every out-of-range numeric value of a parsed LightningCLI (sub)command config, as one message each.

    Args:
        config: The subcommand's config (``model``, ``data``, ``trainer`` keys), a ``Namespace`` or a dict.
    """
    cfg = _as_dict(config) or {}
    errors: list[str] = []
    for key in ("model", "data"):
        for flag, class_path, args in _components(cfg.get(key), f"--{key}"):
            for name, rule in rules_for(class_path).items():
                if name in args and (msg := _check(f"{flag}.{name}", args[name], rule, None)):
                    errors.append(msg)
        # config dataclasses without class_path (policy: PolicyConfig, init: TinyLlamaConfig)
        args = _as_dict((_as_dict(cfg.get(key)) or {}).get("init_args")) or {}
        for arg, cls in NESTED.items():
            nested = _as_dict(args.get(arg))
            if isinstance(nested, Mapping):
                for name, rule in KNOBS[cls].items():
                    if name in nested and (msg := _check(f"--{key}.init_args.{arg}.{name}", nested[name], rule,
                                                         None)):
                        errors.append(msg)
    trainer = _as_dict(cfg.get("trainer")) or {}
    for name, rule in KNOBS["Trainer"].items():
        if name in trainer and (msg := _check(f"--trainer.{name}", trainer[name], rule, None)):
            errors.append(msg)
    errors += trainer_errors(trainer)
    for flag, class_path, args in _components(trainer.get("callbacks"), "--trainer.callbacks"):
        owner = class_path.rsplit(".", 1)[-1]
        for name, rule in rules_for(class_path).items():
            if name in args and (msg := _check(f"{flag}.{name}", args[name], rule, owner)):
                errors.append(msg)
    return errors


def trainer_errors(trainer: Mapping[str, Any]) -> list[str]:
    """Trainer values Lightning would reject with a traceback: ``max_time`` and an accelerator this machine
    lacks."""
    errors = []
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices != -1 and devices < 1:
        errors.append(f"--trainer.devices={devices}: must be -1 (all), >= 1, a list of device ids or auto")
    max_time = trainer.get("max_time")
    if isinstance(max_time, str) and not _MAX_TIME.fullmatch(max_time.strip()):
        errors.append(f"--trainer.max_time={max_time}: expected DD:HH:MM:SS (e.g. 00:12:00:00) or null")
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda", "mps"):
        import torch

        has = torch.cuda.is_available() if accelerator != "mps" else torch.backends.mps.is_available()
        if accelerator == "gpu" and not has:
            has = torch.backends.mps.is_available()
        if not has:
            errors.append(f"--trainer.accelerator={accelerator}: no such device on this machine; use cpu or auto")
    return errors


#: A callback class (or base) -> the module class (or base) it acts on; on another module it would do nothing.
CALLBACK_NEEDS: dict[str, str] = {
    "ReplayCallback": "GRPOUnlearningModule",  # stores / replays GRPO rollout groups
    "PromptReplayCallback": "GRPOUnlearningModule",
}


def mro_names(class_path: str) -> list[str]:
    """The names of a ``class_path``'s class and its bases (just its own name when it cannot be imported)."""
    module, _, attr = str(class_path).rpartition(".")
    try:
        return [c.__name__ for c in getattr(importlib.import_module(module), attr).__mro__]
    except Exception:  # noqa: BLE001
        return [str(class_path).rsplit(".", 1)[-1]]


def overlay_errors(config: Any) -> list[str]:
    """Callbacks that would have no effect on the configured model (a replay overlay on a non-GRPO module)."""
    cfg = _as_dict(config) or {}
    model = _as_dict(cfg.get("model")) or {}
    model_path = str(model.get("class_path") or "") if isinstance(model, Mapping) else ""
    if not model_path:
        return []
    model_mro = mro_names(model_path)
    errors = []
    for _, class_path, _ in _components((_as_dict(cfg.get("trainer")) or {}).get("callbacks"), "--trainer.callbacks"):
        for base in mro_names(class_path):
            need = CALLBACK_NEEDS.get(base)
            if need is not None and need not in model_mro:
                errors.append(f"--trainer.callbacks: {class_path.rsplit('.', 1)[-1]} acts on a {need}'s rollouts, "
                              f"but the model is {model_path.rsplit('.', 1)[-1]}: it would do nothing; drop the "
                              "replay overlay (configs/replay/*.yaml) or train a GRPO module")
                break
    return errors
