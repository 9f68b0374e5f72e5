"""Worker for tests/test_replay_ddp.py: a ReRULE fit under strategy=ddp, accelerator=cpu, devices=2.

Lightning's DDP launcher re-runs this script once per rank. Each rank writes its replay callback state and
the replayed (prompt id, step) pairs it received to ``<out>/rank<r>.pt``.

    python tests/ddp_replay_worker.py WORLD_DIR TARGET_DIR OUT_DIR [add|fill|prompt]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks import PromptReplayCallback  # noqa: E402
from callbacks.replay import HardCaseReplayCallback  # noqa: E402
from datamodules.forget_retain import ForgetRetainDataModule  # noqa: E402
from rerule_lightning.modules.grpo import GRPOUnlearningModule  # noqa: E402
from rerule_lightning.primitives.policy import PolicyConfig  # noqa: E402


class Record(L.Callback):
    def __init__(self) -> None:
        self.replayed: list[tuple[str, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for g in batch.get("replay") or []:
            self.replayed.append((g.prompt_id, g.step, trainer.global_step))


def main() -> None:
    world, target, out = sys.argv[1:4]
    mode = sys.argv[4] if len(sys.argv) > 4 else "add"
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if mode == "add":
        cb = HardCaseReplayCallback(spend="add", advantages="running",
                                    collect_steps=2, replay_start=2, reward_threshold=1.0, require_variance=False,
                                    replay_groups=1, max_replays=5, retire_solved=False)
    elif mode == "fill":  # ranks use different numbers of the offered groups (their own zero-variance count)
        cb = HardCaseReplayCallback(advantages="running", spend="fill",
                                    replay_groups=None, replay_start=1, reward_threshold=1.0,
                                    max_replays=5, retire_solved=False)
    else:  # appended prompts must keep every rank's batch the same size
        cb = PromptReplayCallback(replay_start=1, reward_threshold=1.0, replay_groups=1, retire_solved=False)
    rec = Record()
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=target), num_generations=4, max_new_tokens=8,
                                  learning_rate=1e-3, beta=0.01)
    data = ForgetRetainDataModule(world_dir=world, preset="hard", batch_size=2)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        enable_checkpointing=False, callbacks=[cb, rec])
    trainer.fit(module, datamodule=data)
    os.makedirs(out, exist_ok=True)
    torch.save({"state": cb.state_dict(), "replayed": rec.replayed,
                "params": {k: v.detach().clone() for k, v in module.model.state_dict().items()}},
               os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
