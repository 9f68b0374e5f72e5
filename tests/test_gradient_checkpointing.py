"""LoRA with gradient checkpointing trains: non-re-entrant checkpointing (and input gradients under (Q)LoRA) give
every adapter the same gradient as without checkpointing. Re-entrant checkpointing behind a frozen embedding
gives the adapters inside no gradient at all (transformers 4.57: "element 0 of tensors does not require grad")."""

from __future__ import annotations

import pytest
import torch

from rerule_lightning.primitives.policy import PolicyConfig, build_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adapter_grads(target: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    torch.manual_seed(0)
    model = build_policy(PolicyConfig(name_or_path=target, peft="lora", lora_r=4, lora_alpha=8,
                                      gradient_checkpointing=checkpointing))
    for n, p in model.named_parameters():  # B = 0 at init would make every A-gradient 0: give B values
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}, model


def test_lora_with_gradient_checkpointing_gives_every_adapter_its_gradient(tiny_prepared: dict) -> None:
    target = tiny_prepared["links"]["target"]
    plain, _ = adapter_grads(target, False)
    ckpt, model = adapter_grads(target, True)
    assert model.base_model.model.model.gradient_checkpointing, "checkpointing not enabled"
    assert ckpt.keys() == plain.keys() and len(plain) == sum(1 for n, p in model.named_parameters() if p.requires_grad)
    for k in plain:
        assert float(ckpt[k].abs().sum()) > 0, f"{k}: no gradient under checkpointing"
        # float32, the same ops recomputed: equal up to rounding
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)


def test_lora_fit_with_gradient_checkpointing(tiny_prepared: dict, tmp_path) -> None:
    import lightning as L

    from datamodules.forget_retain import ForgetRetainDataModule
    from rerule_lightning.modules.grpo import GRPOUnlearningModule

    links = tiny_prepared["links"]
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=links["target"], peft="lora", lora_r=4, lora_alpha=8,
                                                      gradient_checkpointing=True),
                                  num_generations=4, max_new_tokens=6, temperature=2.0, learning_rate=1e-2, beta=0.1,
                                  micro_batch_size=8)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_A" in n}
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
              default_root_dir=str(tmp_path)).fit(module, datamodule=ForgetRetainDataModule(
                  world_dir=links["world"], batch_size=4, seed=0))
    moved = [n for n, p in module.model.named_parameters() if "lora_A" in n and not torch.equal(p, before[n])]
    assert len(moved) == len(before), "an adapter did not train under gradient checkpointing"
