"""A callback that times the training and validation phases of a fit separately (benchmarks only).

``train_s`` sums the wall-clock of every training batch (rollout, reward, loss, backward, optimizer step and
the callbacks' batch hooks: replay admission and sampling included); ``val_s`` sums every validation loop.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class PhaseTimer(L.Callback):
    """Wall-clock of training batches and of validation loops, in seconds."""

    def __init__(self) -> None:
        self.train_s = 0.0
        self.val_s = 0.0
        self._t = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.train_s += time.perf_counter() - self._t

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._v = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_s += time.perf_counter() - self._v
