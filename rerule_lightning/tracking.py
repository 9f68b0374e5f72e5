"""MLflow integration: the resolved config as a run artifact, flattened params, run status."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts / lists into ``a.b.c`` keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config next to the run (as Lightning does) and, under MLflow, logs it as the
    artifact ``config.yaml`` and its flattened values as params."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.log_dir is not None:
            return super().setup(trainer, pl_module, stage)
        # MLflow with a database or server URI has no local log dir: keep a copy under default_root_dir.
        if trainer.is_global_zero:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            path = os.path.join(trainer.default_root_dir, self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, MLFlowLogger):
                continue
            text = self.parser.dump(self.config, skip_none=False)
            logger.experiment.log_text(logger.run_id, text, "config.yaml")
            cfg = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
            params = {k: v for k, v in flatten(cfg).items() if not k.startswith("config")}
            logger.log_hyperparams(params)
