"""Rejection steering under (Q)LoRA exports merged weights, so the RL stage's KL reference is the RS model."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.sft import EmbeddedSFTDataModule
from rerule_lightning.modules.sft import SFTModule
from rerule_lightning.primitives.policy import PolicyConfig, build_policy, load_tokenizer, reference_context


def _rs_fit(tiny: dict, peft: str, export: Path, merged: bool) -> SFTModule:
    policy = PolicyConfig(name_or_path=tiny["links"]["target"], peft=peft, lora_r=4, lora_alpha=8)
    module = SFTModule(policy=policy, learning_rate=5e-2, export_dir=str(export), export_merged=merged)
    data = EmbeddedSFTDataModule(world_dir=tiny["links"]["world"], tokenizer=tiny["links"]["tokenizer"],
                                 mode="rejection_steering", batch_size=8)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return module


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # [1, L, V]


@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_peft_rejection_steering_exports_merged_weights(peft: str, tiny_prepared: dict, tmp_path: Path,
                                                        one_torch_thread: None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if peft == "qlora":
        from tests.test_grpo_module import _bnb_4bit_cpu_error

        reason = _bnb_4bit_cpu_error()
        if reason is not None:
            pytest.skip(f"bitsandbytes cannot run 4-bit NF4 on this CPU: {reason}")
    export = tmp_path / "rs"
    _rs_fit(tiny_prepared, peft, export, merged=True)
    # plain weights at the top (what the RL stage loads), the adapters kept beside them
    assert (export / "config.json").is_file() and not (export / "adapter_config.json").exists()
    assert (export / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    merged = AutoModelForCausalLM.from_pretrained(str(export))
    base = AutoModelForCausalLM.from_pretrained(tiny_prepared["links"]["target"])
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_prepared["links"]["target"]), str(export / "adapter"))
    # merged == unquantised base + the trained adapters, and differs from the base (the adapters learned)
    torch.testing.assert_close(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-4, rtol=1e-4)
    assert (_logits(merged, ids) - _logits(base, ids)).abs().max() > 1e-3
    # the RL stage starting from the export under LoRA: its adapter-free reference is the RS model
    policy = build_policy(PolicyConfig(name_or_path=str(export), peft="lora", lora_r=4, lora_alpha=8))
    with reference_context(policy):
        torch.testing.assert_close(_logits(policy, ids), _logits(merged, ids), atol=1e-5, rtol=1e-5)
    assert load_tokenizer(PolicyConfig(name_or_path=str(export))).pad_token_id is not None


def test_adapter_only_export_when_asked(tiny_prepared: dict, tmp_path: Path, one_torch_thread: None) -> None:
    export = tmp_path / "rs"
    _rs_fit(tiny_prepared, "lora", export, merged=False)
    assert (export / "adapter_config.json").is_file()
    assert not os.path.exists(export / "adapter")


def test_full_fine_tuning_export_is_unchanged(tiny_prepared: dict, tmp_path: Path, one_torch_thread: None) -> None:
    export = tmp_path / "rs"
    _rs_fit(tiny_prepared, "full", export, merged=True)
    assert (export / "config.json").is_file() and not os.path.exists(export / "adapter")
