"""The callback of ``benchmarks/frontier.py``: every validation of a fit is a frontier point (benchmarks only).

At each validation end it appends to a JSON file (rewritten atomically) the point ``{"step", "epoch",
"sequences", "train_s", "select": {metric: value}}``: the validation metrics (the benchmark validates on the
selection half), the optimizer steps and epochs done, the sequences forwarded and back-propagated so far and the
training seconds so far (training batches only, validation excluded, as :class:`benchmarks.timing.PhaseTimer`).

Sequences per training batch: GRPO, ``B·G`` (the fresh rollouts; ``spend: fill`` trains on at most that), or
the step's ``train/sequences_trained`` when larger (``spend: add`` trains on the replayed groups as well);
loss-based baselines, the forget rows (twice for IdkDPO: the "I don't know" and the original answer) plus the
retain rows when a retain term is on (a regulariser, or RMU).

``stop_step`` / ``stop_epoch`` end the fit once that many optimizer steps / epochs are done (after that point's
validation), with every other setting unchanged (the learning-rate schedule still sees ``max_steps`` /
``max_epochs``): the re-run to a chosen point, whose validation is checked equal to the recorded one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning as L

from benchmarks.timing import PhaseTimer

#: Validation metrics kept per point (the frontier's axes, the constraints and the output classes).
POINT_METRICS = tuple(f"{s}/{m}" for s in ("forget", "boundary_hard", "boundary_easy", "retain")
                      for m in ("refusal_rate", "answer_accuracy", "wrong_answer_rate", "degenerate_rate"))


def batch_sequences(module: Any, batch: Any, trainer: L.Trainer) -> float:
    """Sequences one training batch forwarded and back-propagated (see the module docstring)."""
    h = module.hparams
    if "num_generations" in h:
        fresh = float(len(batch["prompt"]) * int(h.num_generations))
        extra = trainer.callback_metrics.get("train/sequences_trained")
        return max(fresh, float(extra)) if extra is not None else fresh
    b = float(len(batch["forget_prompt"]))
    retain = h.get("method") == "rmu" or h.get("regularizer", "none") != "none"
    return b * (2.0 if h.get("method") == "idkdpo" else 1.0) + (b if retain else 0.0)


class FrontierPoints(PhaseTimer):
    """Records every validation as a frontier point; optionally stops the fit at a step or epoch.

    Args:
        path: JSON file the points are written to (a list, rewritten after each validation).
        stop_step: End the fit after this many optimizer steps (its validation included).
        stop_epoch: End the fit after this many epochs (its validation included).
    """

    def __init__(self, path: str, stop_step: int | None = None, stop_epoch: int | None = None) -> None:
        super().__init__()  # train_s: training batches only (PhaseTimer)
        self.path, self.stop_step, self.stop_epoch = path, stop_step, stop_epoch
        self.points: list[dict[str, Any]] = []
        self.sequences = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.sequences += batch_sequences(pl_module, batch, trainer)
        if self.stop_step is not None and trainer.global_step >= self.stop_step:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stop_epoch is not None and trainer.current_epoch + 1 >= self.stop_epoch:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        cm = trainer.callback_metrics
        select = {k: float(cm[k]) for k in POINT_METRICS if k in cm and math.isfinite(float(cm[k]))}
        # an epoch-end validation runs before the epoch counter moves on: current_epoch + 1 epochs are done
        epoch = trainer.current_epoch + 1
        self.points.append({"step": int(trainer.global_step), "epoch": int(epoch), "sequences": self.sequences,
                            "train_s": self.train_s, "select": select})
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.points, f, indent=1)
        os.replace(tmp, self.path)
