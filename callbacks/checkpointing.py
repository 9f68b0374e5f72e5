"""``ResumableCheckpoint``: the checkpoints of a long real-benchmark run (``configs/checkpointing.yaml``).

A ``ModelCheckpoint`` that

* saves every ``every_n_train_steps`` optimizer steps and ``last.ckpt``, lean as every checkpoint of the project
  (trainable weights and their optimizer state only), into ``<trainer.default_root_dir>/checkpoints`` unless
  ``dirpath`` is given: a stable directory, so ``--ckpt_path last`` finds it on resume (Lightning's default
  directory would be inside the MLflow run, new on every run);
* saves one more checkpoint when SIGTERM stops the fit (Lightning stops at the end of the running step, so the
  state is consistent), whose path the command's ending line names;
* writes the module's export (``export_dir``, :func:`rerule_lightning.modules.exporting.export_module`) with each
  checkpoint (``export: true``), so an interrupted run leaves a usable model; its model card says it is a
  checkpoint export and at which step. The end of fit overwrites it with the final one.

Resuming (``rerule fit ... --ckpt_path last``) continues exactly: the sampling seed, the batch stream and the
optimizer state are functions of, or stored with, ``global_step`` (tests/test_checkpointing_overlay.py).
"""

import os
from typing import Annotated, Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rerule_lightning.modules.exporting import export_module
from rerule_lightning.primitives.ranges import Count, Range, range_errors


class ResumableCheckpoint(ModelCheckpoint):
    """Checkpoints every N steps and on SIGTERM, in a stable directory, with an export beside each.

    Args:
        dirpath: Checkpoint directory; ``None``: ``<trainer.default_root_dir>/checkpoints``.
        every_n_train_steps: Save every this many optimizer steps.
        save_top_k: How many step checkpoints to keep besides ``last.ckpt`` (``-1``: all).
        export: Also write the module's ``export_dir`` at each checkpoint and on SIGTERM.
        filename: Checkpoint file name pattern (``step000050.ckpt``).
        auto_insert_metric_name: Prefix each formatted metric with its name (off: the pattern says it).
        **kwargs: Further ``ModelCheckpoint`` arguments (``filename``, ``save_weights_only``, ...).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: Count = 25,
                 save_top_k: Annotated[int, Range(-1, integer=True)] = 1,
                 export: bool = True, filename: str = "step{step:06d}", auto_insert_metric_name: bool = False,
                 **kwargs: Any) -> None:
        if errors := range_errors(type(self), locals()):
            raise ValueError("ResumableCheckpoint: " + "; ".join(errors))
        for fixed in ("save_last", "monitor"):
            kwargs.pop(fixed, None)
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=save_top_k,
                         save_last=True, monitor=None, filename=filename,
                         auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        self.export = export
        self._exported_step: int | None = None
        self._ending = False  # the end of fit writes the final export itself

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.export and not self._ending and trainer.state.fn == "fit" \
                and self._exported_step != trainer.global_step:
            self._exported_step = trainer.global_step
            export_module(trainer.lightning_module, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ending = True
        try:
            super().on_train_end(trainer, pl_module)
        finally:
            self._ending = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (stopped at a step's end): a checkpoint and ``last.ckpt`` of that step, and the export."""
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return  # another error may have stopped mid-step: its state is not one to resume from
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_checkpoint(trainer, self.format_checkpoint_name(metrics=candidates))
            self._save_last_checkpoint(trainer, candidates)


__all__ = ["ResumableCheckpoint"]
