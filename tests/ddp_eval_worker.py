"""Worker for tests/test_eval_ddp.py: validation of EvalModule under strategy=ddp, accelerator=cpu, devices=2.

Lightning's DDP launcher re-runs this script once per rank; rank 0 writes the logged metrics as JSON.

    python tests/ddp_eval_worker.py WORLD_DIR TARGET_DIR RETAIN_DIR OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.forget_retain import ForgetRetainDataModule  # noqa: E402
from rerule_lightning.modules.eval import EvalModule  # noqa: E402
from rerule_lightning.primitives.policy import PolicyConfig  # noqa: E402

SPLITS = ["forget", "boundary_hard", "holdout"]


def build(world: str, target: str, retain: str) -> tuple[EvalModule, ForgetRetainDataModule]:
    module = EvalModule(policy=PolicyConfig(name_or_path=target), eval_reference=retain, eval_max_new_tokens=12)
    data = ForgetRetainDataModule(world_dir=world, eval_splits=SPLITS, eval_max_items=12, eval_batch_size=4)
    return module, data


def main() -> None:
    world, target, retain, out = sys.argv[1:5]
    torch.set_num_threads(1)
    module, data = build(world, target, retain)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, datamodule=data, verbose=False)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, f)


if __name__ == "__main__":
    main()
