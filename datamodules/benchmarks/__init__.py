"""Real unlearning benchmarks (TOFU, MUSE-Books, MUSE-News, RWKU) on a common base.

* :mod:`datamodules.benchmarks.sources`: loading rows (hub id or local directory) and schema validation.
* :mod:`datamodules.benchmarks.base`: :class:`BenchmarkDataModule` (RL prompts, eval items, prompt rendering).
* :mod:`datamodules.benchmarks.rs`: rejection steering data for any benchmark.
"""

from datamodules.benchmarks.base import BenchmarkDataModule
from datamodules.benchmarks.sources import SchemaError, load_rows, validate_rows

__all__ = ["BenchmarkDataModule", "SchemaError", "load_rows", "validate_rows"]
