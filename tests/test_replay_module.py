"""The module's side of replay on the real trainer path (tiny prepared world): ``spend: fill`` keeps a step at
B·G trained sequences and replaces exactly the zero-variance groups, fresh and replayed tokens share one
normaliser (checked by hand on the step's own tensors), μ = 2 (second-iteration ratio by hand, schedules in
rollout batches), and replayed groups reuse their stored reference log-probs."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import pytest
import torch

import rerule_lightning.modules.grpo as gm
from callbacks import HardCaseReplayCallback
from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.policy import PolicyConfig
from rerule_lightning.primitives.rollout import RolloutGroup
from rerule_lightning.rl.grpo import k3_kl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, G, BETA = 4, 4, 0.01


class Spy(L.Callback):
    """Per step: global_step at the start, the batch's replay offer, the step's outputs, and the number of rows
    of every policy forward that builds a graph (exactly what the backward covers)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.offered: list[list[RolloutGroup]] = []
        self.outputs: list[dict[str, Any]] = []
        self.rows: list[list[int]] = []

    def on_train_start(self, trainer, pl_module):  # noqa: D102
        def count(mod, args, kwargs):
            if kwargs.get("use_cache") and kwargs.get("cache", kwargs.get("past_key_values")) is None:
                return  # a shared-prefix pass's prompt encoding (one row per distinct prompt): rows are its others
            if torch.is_grad_enabled():
                self.rows[-1].append(int(kwargs["input_ids"].size(0)))

        pl_module.model.register_forward_pre_hook(count, with_kwargs=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self.starts.append(trainer.global_step)
        self.offered.append(list(batch.get("replay") or []))
        self.rows.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.outputs.append(outputs)


def fit(tiny_prepared: dict, callbacks: list, max_steps: int, **module_kw) -> GRPOUnlearningModule:
    links = tiny_prepared["links"]
    L.seed_everything(0, verbose=False)
    kw = {"num_generations": G, "max_new_tokens": 8, "learning_rate": 1e-3, "beta": BETA, "seed": 0,
          "temperature": 2.0, **module_kw}
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=links["target"]), **kw)
    data = ForgetRetainDataModule(world_dir=links["world"], preset="hard", batch_size=B, seed=0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    module.trainer_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module


def test_fill_trains_on_at_most_BG_sequences_and_replaces_exactly_the_zero_variance_groups(tiny_prepared):
    cb = HardCaseReplayCallback(advantages="running", spend="fill",
                                replay_groups=None, replay_start=1, reward_threshold=1.0,
                                max_replays=10, retire_solved=False)
    spy = Spy()
    module = fit(tiny_prepared, [cb, spy], max_steps=4)
    filled = 0
    for step, (offered, out, rows) in enumerate(zip(spy.offered, spy.outputs, spy.rows)):
        zero = [i for i, g in enumerate(out["groups"]) if g.rewards.min() == g.rewards.max()]
        # label-matched fill (balance_labels): each zero-variance group, in batch order, takes the best offered
        # group of its own label not yet taken
        expect_used, expect_out = [], []
        for i in zero:
            j = next((j for j, o in enumerate(offered) if j not in expect_used
                      and o.label == out["groups"][i].label), None)
            if j is not None:
                expect_used.append(j)
                expect_out.append(i)
        n = len(expect_used)
        assert out["replay_used"] == expect_used
        left_out = [i for i, g in enumerate(out["groups"]) if g.behaviour_logprobs is None]
        assert left_out == expect_out, f"step {step}: replaced {left_out}, zero-variance groups {zero}"
        assert sum(rows) == B * G, f"step {step}: the backward covered {rows} sequences"
        assert len(rows) == (1 if n in (0, B) else 2)  # fresh forward (kept groups) + replayed forward
        filled += n
    assert filled > 0 and len(spy.offered[0]) == 0 and len(spy.offered[1]) > 0
    assert cb.buffer.tally.totals["filled"] == filled == cb.buffer.tally.totals["replayed"]
    assert module.trainer_metrics["replay/filled_total"] == filled
    assert 0 < module.trainer_metrics["replay/fill_fraction"] <= 1


def test_fresh_and_replayed_tokens_share_one_normaliser_on_the_real_step(tiny_prepared, monkeypatch):
    calls: list[dict[str, Any]] = []
    real_loss = gm.grpo_loss

    def spy_loss(logp, old_logp, adv, mask, **kw):
        loss, stats = real_loss(logp, old_logp, adv, mask, **kw)
        calls.append({"logp": logp.detach(), "old": old_logp, "adv": adv, "mask": mask, "loss": loss.detach(), **kw})
        return loss, stats

    monkeypatch.setattr(gm, "grpo_loss", spy_loss)
    policy_passes: list[torch.Tensor] = []

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            real = pl_module.sequence_logprobs

            def wrapped(*a, reference=False, **k):
                out = real(*a, reference=reference, **k)
                if not reference:
                    policy_passes.append(out[0].detach())
                return out

            pl_module.sequence_logprobs = wrapped

    cb = HardCaseReplayCallback(spend="add", advantages="running",
                                replay_start=1, reward_threshold=1.0, replay_groups=2, replay_loss_weight=0.5)
    spy = Spy()
    fit(tiny_prepared, [cb, spy, Capture()], max_steps=2)
    c, replay = calls[1], spy.offered[1]
    assert len(replay) == 2 and len(policy_passes) == 3  # step 0: fresh; step 1: fresh, replayed
    (r_tok, r_mask, weight), = c["extra"]
    assert weight == 0.5
    # fresh tokens, on-policy (ρ = 1, no clip binds): ℓ = −A + β·k3(logp, ref)
    m = c["mask"]
    fresh = -c["adv"][:, None] + BETA * k3_kl(c["logp"], torch.where(m > 0, c["ref_logp"], c["logp"]))
    # replayed tokens, truncated IS against the stored behaviour log-probs: ℓ = −min(ρ, 2)·A·logp + β·k3
    logp_r, rm = policy_passes[2], r_mask
    t = logp_r.size(1)
    beh = torch.cat([torch.nn.functional.pad(g.behaviour_logprobs, (0, t - g.behaviour_logprobs.size(1)))
                     for g in replay])[:, :t]
    ref = torch.cat([torch.nn.functional.pad(g.reference_logprobs, (0, t - g.reference_logprobs.size(1)))
                     for g in replay])[:, :t]
    adv_r = torch.cat([g.advantages for g in replay])[:, None]
    rho = torch.exp(torch.where(rm > 0, logp_r - beh, torch.zeros_like(logp_r))).clamp(max=2.0)
    replayed = -rho * adv_r * logp_r + BETA * k3_kl(logp_r, torch.where(rm > 0, ref, logp_r))
    torch.testing.assert_close(r_tok.detach() * rm, replayed * rm, atol=1e-5, rtol=1e-5)
    # one normaliser: every token of the step, fresh and replayed, counts once; replayed ones weigh 0.5
    n_tokens = float(m.sum() + rm.sum())
    assert c["num_active_tokens"] == n_tokens
    expected = ((fresh * m).sum() + 0.5 * (replayed * rm).sum()) / n_tokens
    torch.testing.assert_close(c["loss"], expected, atol=1e-5, rtol=1e-5)


def test_two_iterations_per_rollout_batch(tiny_prepared, monkeypatch):
    calls: list[dict[str, Any]] = []
    real_loss = gm.grpo_loss

    def spy_loss(logp, old_logp, adv, mask, **kw):
        loss, stats = real_loss(logp, old_logp, adv, mask, **kw)
        calls.append({"logp": logp.detach(), "old": old_logp.clone(), "adv": adv, "mask": mask, "loss": loss.detach(),
                      **kw})
        return loss, stats

    monkeypatch.setattr(gm, "grpo_loss", spy_loss)
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running",
                                replay_start=0.5, reward_threshold=1.0, retire_solved=False)
    spy = Spy()
    module = fit(tiny_prepared, [cb, spy], max_steps=4, num_iterations=2, learning_rate=1e-2, max_grad_norm=0.0)
    # Lightning counts both optimizer steps of a batch in global_step: 4 steps = 2 rollout batches
    assert spy.starts == [0, 2] and len(calls) == 4
    assert cb.replay_from == 1  # 0.5 of 4 // 2 = 2 rollout batches
    assert [len(o) for o in spy.offered] == [0, 2]
    assert [g.step for g in spy.outputs[1]["groups"]] == [2] * B
    assert module.trainer_metrics["replay/mean_age"] == 1.0  # sampled at batch 0, replayed at batch 1
    first, second = calls[0], calls[1]
    assert torch.equal(first["old"], first["logp"])  # iteration 1: π_old is this very pass
    assert torch.equal(second["old"], first["logp"])  # iteration 2 reuses it
    m, adv = second["mask"], second["adv"][:, None]
    rho = torch.exp(second["logp"] - second["old"])
    assert float(((rho - 1).abs() * m).max()) > 1e-3, "the update did not move the second iteration's ratio"
    # by hand: ℓ = −min(ρA, clip(ρ, 1 − 0.2, 1 + 0.3)A), then for A < 0 at most −3A (dual clip), + β·k3
    surrogate = -torch.minimum(rho * adv, rho.clamp(0.8, 1.3) * adv)
    surrogate = torch.where(adv < 0, torch.minimum(surrogate, -3.0 * adv), surrogate)
    ref = torch.where(m > 0, second["ref_logp"], second["logp"])
    d = (ref - second["logp"]).clamp(-20, 20)
    per_token = surrogate + BETA * (torch.exp(d) - d - 1).clamp(max=10)
    expected = (per_token * m).sum() / m.sum()
    torch.testing.assert_close(second["loss"], expected, atol=1e-6, rtol=1e-5)


def test_replayed_groups_reuse_their_stored_reference_logprobs(tiny_prepared, monkeypatch):
    """Fresh groups carry the reference log-probs of their step; replaying them needs no new reference pass,
    and the stored values equal a fresh reference pass over the same completions (the reference is frozen)."""
    spy = Spy()
    module = fit(tiny_prepared, [spy], max_steps=2)
    groups = [g for out in spy.outputs for g in out["groups"]]
    assert all(g.reference_logprobs is not None and g.reference_logprobs.shape == g.behaviour_logprobs.shape
               for g in groups)
    assert all(torch.equal(g.reference_logprobs * (1 - g.completion_mask), torch.zeros_like(g.reference_logprobs))
               for g in groups)  # 0.0 on padding
    calls = []
    real = module.sequence_logprobs
    monkeypatch.setattr(module, "sequence_logprobs", lambda *a, **k: calls.append(k) or real(*a, **k))
    inputs = module.replay_inputs(groups[:3])
    assert not any(k.get("reference") for k in calls), "replay ran a reference pass despite stored log-probs"
    with torch.no_grad():
        fresh, m = real(inputs["prompt_ids"], inputs["completion_ids"], inputs["completion_mask"], reference=True)
    t = fresh.size(1)
    torch.testing.assert_close(inputs["ref_logprobs"][:, :t] * m, fresh * m, atol=1e-5, rtol=1e-5)

    def cut(g: RolloutGroup, n: int) -> RolloutGroup:  # stored rows wider than every real completion
        keep = (torch.arange(g.completion_ids.size(1)) < n).float()  # [T]
        return dataclasses.replace(g, completion_mask=g.completion_mask * keep,
                                   behaviour_logprobs=g.behaviour_logprobs * keep,
                                   reference_logprobs=g.reference_logprobs * keep,
                                   advantages=torch.linspace(-1, 1, g.num_completions))

    stored = module.replay_inputs([cut(groups[3], 3), cut(groups[4], 5)])
    tok_stored, mask, _ = module.replay_loss(stored, {})
    recomputed = dict(stored, ref_logprobs=None)
    with torch.no_grad():
        recomputed["ref_logprobs"], _ = real(stored["prompt_ids"], stored["completion_ids"],
                                             stored["completion_mask"], reference=True)
    tok_fresh, _, _ = module.replay_loss(recomputed, {})
    torch.testing.assert_close(tok_stored * mask, tok_fresh * mask, atol=1e-6, rtol=1e-5)
    for g in groups[:3]:  # groups stored without them (an older buffer) still get a reference pass
        g.reference_logprobs = None
    calls.clear()
    module.replay_inputs(groups[:3])
    assert any(k.get("reference") for k in calls)
