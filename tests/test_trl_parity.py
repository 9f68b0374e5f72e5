"""Numeric parity with TRL's GRPO loss: for every ``loss_type`` TRL shares with us (grpo, bnpo, dr_grpo, dapo),
the same logits, old / reference log-probs, advantages and masks give the same loss and the same gradient with
respect to the logits, with and without the KL term.

TRL's loss is the method ``GRPOTrainer._compute_loss``; it is called unbound on a stand-in ``self`` that holds only
the settings the method reads (no model, no accelerator: one process, no gradient accumulation), and whose
``_get_per_token_logps_and_entropies`` returns the log-probs of the test's logits, so both losses see identical
inputs. TRL has no dual clip: ours is off here. Everything runs in float64, so the two implementations can differ
only by the order of floating-point operations: ~1e-16 relative per operation over a few hundred terms, hence the
tolerance of 1e-12 (absolute and relative)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import trl.trainer.grpo_trainer as trl_grpo  # a dev dependency (pyproject [dev]): CI installs it, so no skip

from rerule_lightning.rl.grpo import grpo_loss

B, T, V = 6, 7, 11
MAX_LEN = 9
EPS_LOW, EPS_HIGH = 0.2, 0.28


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def _trl_self(loss_type: str, beta: float, logp: torch.Tensor) -> SimpleNamespace:
    entropy = torch.zeros_like(logp)
    return SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, max_completion_length=MAX_LEN,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, accelerator=_Accelerator(),
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None))


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 1, 4, 7, 3, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()  # [B, T]
    old = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0] + 0.3 * torch.randn(B, T, generator=g,
                                                                                          dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return {"logits": logits, "ids": ids, "mask": mask, "old": old, "ref": ref, "adv": adv}


def _logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]  # [B, T]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_same_loss_and_gradient_as_trl(loss_type: str, beta: float) -> None:
    x = _inputs(seed=["grpo", "bnpo", "dr_grpo", "dapo"].index(loss_type) * 10 + int(beta > 0))
    ours_logits = x["logits"].clone().requires_grad_(True)
    ours, _ = grpo_loss(_logp(ours_logits, x["ids"]), x["old"], x["adv"], x["mask"], ref_logp=x["ref"], beta=beta,
                        eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=None, loss_type=loss_type,
                        max_completion_length=MAX_LEN, num_active_tokens=float(x["mask"].sum()))
    ours.backward()

    trl_logits = x["logits"].clone().requires_grad_(True)
    logp = _logp(trl_logits, x["ids"])
    fake = _trl_self(loss_type, beta, logp)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": x["ids"], "completion_mask": x["mask"], "advantages": x["adv"],
              "old_per_token_logps": x["old"], "ref_per_token_logps": x["ref"],
              "num_items_in_batch": x["mask"].sum()}
    theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad, atol=1e-12, rtol=1e-12)
    assert float(ours_logits.grad.abs().max()) > 1e-3  # a gradient worth comparing
    # the clip engaged on some tokens (old log-probs differ from the current ones), so the clip is compared too
    ratio = (_logp(x["logits"], x["ids"]) - x["old"]).exp()
    assert bool((((ratio < 1 - EPS_LOW) | (ratio > 1 + EPS_HIGH)) & (x["mask"] > 0)).any())
