"""LightningDataModules and data sources: the embedded fictitious world, TOFU, MUSE-Books/News and RWKU.

The public classes are importable from here (``from datamodules import ForgetRetainDataModule``) and usable as
short ``class_path`` values in YAML (``datamodules.TOFUDataModule``). They load lazily, on first access, so
importing the package does not import HF ``datasets`` until a benchmark is used.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    "WorldConfig": "world", "generate_world": "world",
    "load_world": "embedded", "train_tokenizer": "embedded",
    "ForgetRetainDataModule": "forget_retain", "BalancedPromptBatches": "forget_retain",
    "EmbeddedSFTDataModule": "sft",
    "PairedUnlearningDataModule": "paired", "PairedBatches": "paired",
    "BenchmarkDataModule": "benchmarks.base", "SchemaError": "benchmarks.sources", "load_rows": "benchmarks.sources",
    "TOFUDataModule": "benchmarks.tofu", "MUSEDataModule": "benchmarks.muse", "RWKUDataModule": "benchmarks.rwku",
    "RejectionSteeringDataModule": "benchmarks.rs",
    "attack_items": "attack_prompts", "embedded_attack_items": "attack_prompts", "rwku_attack_items": "attack_prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"datamodules.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
