"""Micro-batched GRPO: the accumulated gradient equals the single-pass gradient for every loss type, with and
without replayed groups, and every forward (policy and reference) sees at most ``micro_batch_size`` rows."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.policy import PolicyConfig
from rerule_lightning.primitives.rollout import RolloutGroup
from rerule_lightning.rl.grpo import LOSS_TYPES, aggregate_parts
from rerule_lightning.rl.micro_batch import micro_batches, normaliser, partial_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, G = 4, 4


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_shares_sum_to_the_whole_batch_loss(loss_type: str) -> None:
    gen = torch.Generator().manual_seed(0)
    fresh = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    f_mask = (torch.rand(7, 5, generator=gen) > 0.3).double()
    f_mask[3] = 0.0  # an all-masked row counts as a sequence (grpo, dr_grpo) and adds 0
    replay = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    r_mask = (torch.rand(3, 6, generator=gen) > 0.3).double()
    parts = [(fresh, f_mask, 1.0), (replay, r_mask, 0.5)]
    for active in (None, 17.5):
        whole = aggregate_parts(parts, loss_type, max_completion_length=6, num_active_tokens=active)
        denom = normaliser(loss_type, 10, float(f_mask.sum() + r_mask.sum()), 6, active)
        shares = [partial_loss(p[sl], m[sl], w, loss_type, denom) for p, m, w in parts for sl in micro_batches(len(p), 2)]
        torch.testing.assert_close(sum(shares), whole, rtol=1e-12, atol=1e-12)  # float64: rounding only


def test_micro_batches_cover_the_rows_in_order() -> None:
    assert micro_batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert micro_batches(4, None) == [slice(0, 4)] and micro_batches(0, 2) == []


class Inject(L.Callback):
    """Step 1 replays step 0's fresh groups (as a replay callback would); counts rows per forward."""

    def __init__(self, replay: bool) -> None:
        self.replay, self.previous = replay, []
        self.rows: list[tuple[bool, int]] = []  # (grad enabled, rows) per forward

    def on_train_start(self, trainer, pl_module):  # noqa: D102
        def count(mod, args, kwargs):
            if kwargs.get("use_cache") and kwargs.get("cache", kwargs.get("past_key_values")) is None:
                return  # a shared-prefix pass's prompt encoding (one row per distinct prompt): rows are its others
            if not torch.is_inference_mode_enabled():  # not a rollout's generate()
                self.rows.append((torch.is_grad_enabled(), int(kwargs["input_ids"].size(0))))

        pl_module.model.register_forward_pre_hook(count, with_kwargs=True)
        if pl_module.ref_model is not None:
            pl_module.ref_model.register_forward_pre_hook(count, with_kwargs=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        if self.replay and self.previous:
            batch["replay"] = [RolloutGroup(**{**g.to_state(), "advantages": torch.linspace(-1, 1, G)})
                               for g in self.previous[:3]]
            batch["replay_options"] = {"correction": "truncated", "cap": 2.0, "weight": 0.5}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.previous = list(outputs["groups"])


class Grads(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: D102
        self.grads.append({k: p.grad.clone() for k, p in pl_module.model.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.losses.append(float(outputs["loss"]))


def run(tiny: dict, replay: bool, **kw: Any) -> tuple[Grads, Inject]:
    L.seed_everything(0, verbose=False)
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=tiny["links"]["target"]), num_generations=G,
                                  max_new_tokens=8, temperature=2.0, learning_rate=1e-3, max_grad_norm=0.0,
                                  beta=0.1, seed=0, **kw)
    data = ForgetRetainDataModule(world_dir=tiny["links"]["world"], batch_size=B, seed=0)
    grads, inject = Grads(), Inject(replay)
    L.Trainer(max_steps=2 if replay else 1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
              callbacks=[inject, grads]).fit(module, datamodule=data)
    return grads, inject


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("replay", [False, True], ids=["fresh", "replayed"])
def test_accumulated_gradient_equals_the_single_pass_gradient(tiny_prepared: dict, loss_type: str,
                                                              replay: bool) -> None:
    whole, _ = run(tiny_prepared, replay, loss_type=loss_type)
    micro, inject = run(tiny_prepared, replay, loss_type=loss_type, micro_batch_size=3)
    assert len(whole.grads) == len(micro.grads) == (2 if replay else 1)
    for gw, gm in zip(whole.grads, micro.grads):
        assert gw.keys() == gm.keys() and gw
        for k in gw:
            # float32: the same sums in another order over shorter padded rows (and, at step 1, parameters that
            # differ by step 0's rounding); observed max |diff| 2.1e-7 against gradients up to 0.05
            torch.testing.assert_close(gm[k], gw[k], rtol=1e-4, atol=1e-6, msg=k)
    assert micro.losses == pytest.approx(whole.losses, rel=1e-5, abs=1e-7)
    # every forward, policy (with grad) and reference (without), fresh and replayed, holds at most 3 rows
    assert max(n for _, n in inject.rows) <= 3
    assert any(not grad for grad, _ in inject.rows) and any(grad for grad, _ in inject.rows)
    if replay:  # step 1: 16 fresh + 12 replayed policy rows in micro-batches of 3 (16 = 3+3+3+3+3+1, 12 = 4 x 3)
        assert sum(n for grad, n in inject.rows if grad) == 16 + 16 + 12


def test_micro_batch_size_is_checked() -> None:
    with pytest.raises(ValueError, match=r"micro_batch_size=0: must be null \(off\) or >= 1"):
        GRPOUnlearningModule(micro_batch_size=0)
