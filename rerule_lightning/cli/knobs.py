"""The numeric init arguments of a parsed ``rerule fit | validate | test`` config, checked before instantiation.

The ranges live in the signatures (``epsilon_low: UnitBelowOne = 0.2``, :mod:`rerule_lightning.primitives.ranges`):
:func:`knob_errors` walks the config (YAML files and flags already merged, so both are checked the same way),
reads each component's ranges from its class (:func:`~rerule_lightning.primitives.ranges.ranges_of`, along the MRO,
so a user's subclass of :class:`~rerule_lightning.GRPOUnlearningModule` is checked as its parent, and init
arguments typed as a config dataclass, such as ``policy``, by its fields) and returns one message per
out-of-range value naming its flag, e.g. ``--model.init_args.epsilon_low=1.5: must be in [0, 1)``. Only classes
the project does not own (``Trainer``, ``ModelCheckpoint``) keep a table, :data:`KNOBS`.

Constructors check the same annotations themselves (they also run outside the CLI); this pass is what makes the
CLI fail before any class is built, with the flag's full name.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Union

from rerule_lightning.primitives.ranges import (  # noqa: F401 (re-exported)
    COUNT,
    COUNT_OR_NULL,
    NULL,
    Range,
    hints_of,
    range_errors,
    ranges_of,
)

#: The ranges of classes the project does not own (their signatures carry none), by class name.
KNOBS: dict[str, dict[str, Range]] = {
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

_MAX_TIME = re.compile(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}")


def _load(class_path: str) -> Any:
    module, _, attr = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - an unknown class: jsonargparse reports it
        return None


def rules_for(class_path: str) -> dict[str, Range]:
    """The ranges of a class: its signature's (:func:`~rerule_lightning.primitives.ranges.ranges_of`) and, for a
    class the project does not own, its own and its bases' entries in :data:`KNOBS` (nearest class wins)."""
    out: dict[str, Range] = {}
    for n in reversed(mro_names(class_path)):
        out.update(KNOBS.get(n, {}))
    cls = _load(class_path)
    return {**out, **ranges_of(cls)} if isinstance(cls, type) else out


def _config_class(hint: Any) -> type | None:
    """The config dataclass in a type hint (``PolicyConfig | None`` -> ``PolicyConfig``)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next((c for a in typing.get_args(hint) if (c := _config_class(a)) is not None), None)
    return None


def nested_configs(class_path: str) -> dict[str, type]:
    """Init arguments of a class typed as a config dataclass (``policy: PolicyConfig``), name -> dataclass."""
    cls = _load(class_path)
    if not isinstance(cls, type):
        return {}
    return {k: c for k, h in hints_of(cls).items() if (c := _config_class(h)) is not None}


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


def component_errors(flag: str, class_path: str, args: Mapping[str, Any], owner: str | None = None) -> list[str]:
    """The out-of-range init arguments of one component (and of its config-dataclass arguments)."""
    errors = [msg for name, rule in rules_for(class_path).items()
              if name in args and (msg := rule.error(f"{flag}.{name}", args[name])) is not None]
    for arg, config_cls in nested_configs(class_path).items():
        nested = _as_dict(args.get(arg))
        if isinstance(nested, Mapping):
            errors += range_errors(config_cls, nested, f"{flag}.{arg}.")
    return [e + f" ({owner})" for e in errors] if owner else errors


def knob_errors(config: Any) -> list[str]:
    """Every out-of-range numeric value of a parsed LightningCLI (sub)command config, as one message each.

    Args:
        config: The subcommand's config (``model``, ``data``, ``trainer`` keys), a ``Namespace`` or a dict.
    """
    cfg = _as_dict(config) or {}
    errors: list[str] = []
    for key in ("model", "data"):
        for flag, class_path, args in _components(cfg.get(key), f"--{key}"):
            errors += component_errors(flag, class_path, args)
    trainer = _as_dict(cfg.get("trainer")) or {}
    errors += [msg for name, rule in KNOBS["Trainer"].items()
               if name in trainer and (msg := rule.error(f"--trainer.{name}", trainer[name])) is not None]
    errors += trainer_errors(trainer)
    for flag, class_path, args in _components(trainer.get("callbacks"), "--trainer.callbacks"):
        errors += component_errors(flag, class_path, args, owner=class_path.rsplit(".", 1)[-1])
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
