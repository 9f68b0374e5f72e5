"""Lean checkpoints: frozen weights never enter a checkpoint. Full fine-tuning saves the policy (not the frozen
KL reference), LoRA saves the adapters (not the frozen base); a checkpoint's tensors are the trainable state and
its AdamW moments, nothing else; a LoRA fit resumed from such a checkpoint ends exactly where an uninterrupted
one does; an older checkpoint that still carries the frozen keys loads."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import pytest
import torch

from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.checkpointing import frozen_state_keys, safe_load
from rerule_lightning.primitives.policy import PolicyConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fit(tiny: dict, root: Any, peft: str, steps: int, ckpt_path: str | None = None) -> GRPOUnlearningModule:
    L.seed_everything(0, verbose=False)
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=tiny["links"]["target"], peft=peft, lora_r=4,
                                                      lora_alpha=8),
                                  num_generations=4, max_new_tokens=8, temperature=2.0, learning_rate=1e-2,
                                  beta=0.1, seed=0)
    data = ForgetRetainDataModule(world_dir=tiny["links"]["world"], batch_size=4, seed=0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), every_n_train_steps=1, save_top_k=-1,
                                               filename="{step}")
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt],
              default_root_dir=str(root)).fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:  # tied weights share one storage, which torch.save writes once
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_tensors(state: dict) -> list[torch.Tensor]:
    return [v for s in state["optimizer_states"][0]["state"].values() for v in s.values() if v.dim() > 0]


@pytest.mark.parametrize("peft", ["full", "lora", "qlora"])
def test_checkpoint_holds_only_the_trainable_state(tiny_prepared: dict, tmp_path: Any, peft: str) -> None:
    if peft == "qlora":
        from test_grpo_module import _bnb_4bit_cpu_error

        if (err := _bnb_4bit_cpu_error()) is not None:
            pytest.skip(f"bitsandbytes 4-bit unavailable on this CPU: {err}")
    module = fit(tiny_prepared, tmp_path, peft, 1)
    path = tmp_path / "step=1.ckpt"
    ckpt = safe_load(str(path))
    keys = set(ckpt["state_dict"])
    trainable = {f"model.{n}": p for n, p in module.model.named_parameters() if p.requires_grad}
    if peft == "full":
        assert module.ref_model is not None
        assert not any(k.startswith("ref_model.") for k in keys), "the frozen reference was saved"
        # every policy tensor, tied lm_head included (a second name for the embedding's storage)
        assert keys == {f"model.{k}" for k in module.model.state_dict()}
    else:  # (Q)LoRA: the adapters only, no frozen base weight, no 4-bit quantisation state
        assert keys == set(trainable) and all("lora_" in k for k in keys), sorted(keys)[:5]
    saved = list(ckpt["state_dict"].values())
    assert tensor_bytes(saved) == tensor_bytes(list(trainable.values()))
    moments = optimizer_tensors(ckpt)
    assert len(moments) == 2 * len(trainable)  # AdamW exp_avg + exp_avg_sq of each trainable parameter
    assert tensor_bytes(moments) == 2 * tensor_bytes(list(trainable.values()))
    # the file is the trainable state x 3 plus pickled metadata (hparams, loop state: a few tens of KiB)
    assert os.path.getsize(path) < 3 * tensor_bytes(list(trainable.values())) + 256 * 1024
    full_keys = set(torch.nn.Module.state_dict(module))  # what the module would hold without the mixin
    assert frozen_state_keys(module, full_keys) == full_keys - keys


def test_lora_resume_from_a_lean_checkpoint_is_exact(tiny_prepared: dict, tmp_path: Any) -> None:
    straight = fit(tiny_prepared, tmp_path / "a", "lora", 2)
    resumed = fit(tiny_prepared, tmp_path / "b", "lora", 2, ckpt_path=str(tmp_path / "a" / "step=1.ckpt"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA fit differs from the uninterrupted one"


def test_an_older_checkpoint_with_frozen_weights_still_loads(tiny_prepared: dict, tmp_path: Any) -> None:
    module = fit(tiny_prepared, tmp_path, "full", 1)
    fat = torch.nn.Module.state_dict(module)
    assert any(k.startswith("ref_model.") for k in fat)
    other = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=tiny_prepared["links"]["target"]), beta=0.1)
    other.configure_model()
    other.load_state_dict(fat)  # strict: the frozen keys are recognised and skipped, nothing is missing
    assert all(torch.equal(p, module.model.state_dict()[k]) for k, p in other.model.state_dict().items())
    with pytest.raises(RuntimeError, match="missing keys"):
        other.load_state_dict({k: v for k, v in fat.items() if not k.endswith("lm_head.weight")
                               and "layers.0.mlp.up_proj" not in k})
