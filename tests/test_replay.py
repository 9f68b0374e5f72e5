"""HardCaseReplayCallback under real trainer calls, plus unit checks of admission, eviction and checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.replay import HardCaseReplayCallback, RandomReplayCallback
from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.grpo_module import GRPOUnlearningModule
from rerule_lightning.policy import PolicyConfig
from rerule_lightning.rollout import RolloutGroup


def make_group(prompt_id: str, rewards: list[float], step: int, label: str = "boundary") -> RolloutGroup:
    g = len(rewards)
    return RolloutGroup(
        prompt_id=prompt_id, label=label, kind="boundary_hard", prompt_ids=torch.tensor([1, 5, 6]),
        completion_ids=torch.ones(g, 3, dtype=torch.long), completion_mask=torch.ones(g, 3),
        behaviour_logprobs=-torch.ones(g, 3), rewards=torch.tensor(rewards), step=step,
        advantages=torch.zeros(g),
    )


class Spy(L.Callback):
    """Records what the module returned and what the batch carried, per step."""

    def __init__(self) -> None:
        self.groups: list[list[RolloutGroup]] = []
        self.replayed: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.groups.append(list(outputs["groups"]))
        self.replayed.append(len(batch.get("replay") or []))


def build(tiny_prepared: dict, seed: int = 0) -> tuple[GRPOUnlearningModule, ForgetRetainDataModule]:
    links = tiny_prepared["links"]
    # a hot sampling temperature makes the memorising tiny target produce mixed-reward groups
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=links["target"]), num_generations=4,
                                  max_new_tokens=8, learning_rate=1e-3, beta=0.01, seed=seed, temperature=2.0)
    data = ForgetRetainDataModule(world_dir=links["world"], preset="hard", batch_size=4, seed=seed)
    return module, data


def fit(tiny_prepared: dict, callbacks: list, max_steps: int, seed: int = 0, **trainer_kw) -> GRPOUnlearningModule:
    L.seed_everything(seed, verbose=False)
    module, data = build(tiny_prepared, seed)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                        enable_checkpointing=trainer_kw.pop("enable_checkpointing", False), **trainer_kw)
    trainer.fit(module, datamodule=data)
    return module


def test_admission_uses_the_groups_training_step_returned(tiny_prepared):
    cb = HardCaseReplayCallback(collect_steps=3, reward_threshold=0.5, require_variance=False, replay_groups=2)
    spy = Spy()
    fit(tiny_prepared, [cb, spy], max_steps=3)
    fresh = [g for step in spy.groups for g in step]
    assert len(fresh) == 3 * 4  # B = 4 groups per step
    for g in fresh:
        assert g.completion_ids.shape == g.completion_mask.shape == g.behaviour_logprobs.shape
        assert g.completion_ids.size(0) == 4 and g.rewards.shape == (4,)
    expected = [g for g in fresh if float(g.rewards.mean()) <= 0.5]
    assert 0 < len(expected) < len(fresh), "need both admitted and refused groups to test admission"
    stored = [e["group"] for e in cb.buffer]
    assert [(g.prompt_id, g.step) for g in stored] == [(g.prompt_id, g.step) for g in expected]
    for s, e in zip(stored, expected):
        assert torch.equal(s.completion_ids, e.completion_ids)
        assert torch.equal(s.rewards, e.rewards)
    assert cb.totals["admitted"] == len(expected)
    assert spy.replayed == [0, 0, 0]  # the whole fit was the collect phase: nothing replayed


def test_zero_variance_groups_refused_only_when_required():
    flat = make_group("a", [0.0, 0.0, 0.0, 0.0], step=0)
    mixed = make_group("b", [0.0, 0.5, 0.0, 0.0], step=0)
    easy = make_group("c", [1.0, 1.0, 0.5, 1.0], step=0)
    strict = HardCaseReplayCallback(reward_threshold=0.5, require_variance=True)
    loose = HardCaseReplayCallback(reward_threshold=0.5, require_variance=False)
    assert [strict.admissible(g) for g in (flat, mixed, easy)] == [False, True, False]
    assert [loose.admissible(g) for g in (flat, mixed, easy)] == [True, True, False]
    # random replay ignores the reward, keeps the variance rule
    assert [RandomReplayCallback().admissible(g) for g in (flat, mixed, easy)] == [False, True, True]


def test_no_replay_before_collect_steps_then_replay(tiny_prepared):
    cb = HardCaseReplayCallback(collect_steps=2, reward_threshold=1.0, require_variance=False, replay_groups=2,
                                max_replays=10, retire_solved=False)
    spy = Spy()
    fit(tiny_prepared, [cb, spy], max_steps=4)
    assert spy.replayed[:2] == [0, 0]
    assert cb.totals["admitted"] == 8  # every group of steps 0 and 1 (threshold 1.0, no variance rule)
    assert spy.replayed[2:] == [2, 2]
    # no admissions in the hybrid phase: everything stored was sampled at steps 0 and 1
    assert all(e["group"].step < 2 for e in cb.buffer)


def test_eviction_by_age_capacity_and_replays():
    cb = HardCaseReplayCallback(collect_steps=100, capacity=3, max_age=5, max_replays=1, reward_threshold=0.9)
    cb.collect_steps = 100
    groups = [make_group(f"p{i}", [0.0, 0.5, 0.0, r], step=i) for i, r in enumerate([0.0, 0.5, 0.0, 0.5, 0.0])]
    for g in groups:
        cb.buffer.append({"group": g, "replays": 0, "priority": cb.priority(g)})
    cb._evict_capacity()
    # priorities: hardness 1 - mean = 0.875 (r=0) or 0.75 (r=0.5); keep the 3 hardest, newest first on ties
    assert sorted(e["group"].prompt_id for e in cb.buffer) == ["p0", "p2", "p4"]
    assert cb.totals["evicted"] == 2
    cb._evict_old(step=7)  # ages 7, 5, 3: p0 is older than max_age=5
    assert sorted(e["group"].prompt_id for e in cb.buffer) == ["p2", "p4"]
    cb.collect_steps = 0
    chosen = cb._sample(step=8, world_size=1, rank=0)
    assert len(chosen) == 2 and cb.buffer == []  # max_replays=1: used up once handed out


def test_retire_solved_drops_a_prompt_once_a_fresh_group_passes():
    cb = HardCaseReplayCallback(reward_threshold=0.5)
    cb.buffer = [{"group": make_group("p", [0.0, 0.5, 0.0, 0.0], 0), "replays": 0, "priority": 1.0},
                 {"group": make_group("q", [0.0, 0.5, 0.0, 0.0], 0), "replays": 0, "priority": 1.0}]
    cb._retire([make_group("p", [1.0, 1.0, 0.5, 1.0], 3)])
    assert [e["group"].prompt_id for e in cb.buffer] == ["q"]


def test_running_advantages_use_the_label_baseline():
    cb = HardCaseReplayCallback(advantages="running", running_momentum=0.5)
    cb._update_baseline([make_group("x", [1.0, 1.0, 1.0, 1.0], 0)])  # first value: 1.0
    cb._update_baseline([make_group("y", [0.0, 0.0, 0.0, 0.0], 0)])  # 0.5 * 1.0 + 0.5 * 0.0 = 0.5
    g = cb._with_advantages(make_group("z", [0.0, 0.0, 0.0, 0.0], 0))  # zero variance still gets signal
    torch.testing.assert_close(g.advantages, torch.full((4,), -0.5))


def test_bad_arguments_name_the_parameter():
    for kwargs, name in [({"capacity": 0}, "capacity"), ({"correction": "x"}, "correction"),
                         ({"is_level": "x"}, "is_level"), ({"advantages": "x"}, "advantages"),
                         ({"replay_groups": 0}, "replay_groups"), ({"collect_steps": 2.5}, "collect_steps")]:
        with pytest.raises(ValueError, match=name):
            HardCaseReplayCallback(**kwargs)


def test_state_dict_round_trip_loads_with_weights_only(tmp_path):
    cb = HardCaseReplayCallback()
    cb.collect_steps = 4
    cb.buffer = [{"group": make_group("p", [0.0, 0.5, 0.0, 0.0], 1), "replays": 1, "priority": 0.875}]
    cb.baseline = {"boundary": 0.25}
    torch.save(cb.state_dict(), tmp_path / "cb.pt")
    state = torch.load(tmp_path / "cb.pt", weights_only=True)
    other = HardCaseReplayCallback()
    other.load_state_dict(state)
    assert other.collect_steps == 4 and other.baseline == {"boundary": 0.25}
    assert torch.equal(other.buffer[0]["group"].rewards, cb.buffer[0]["group"].rewards)
    assert other.buffer[0]["replays"] == 1


def test_resume_inside_hybrid_phase_matches_uninterrupted_run(tiny_prepared, tmp_path):
    def cb() -> HardCaseReplayCallback:
        return HardCaseReplayCallback(collect_steps=2, reward_threshold=1.0, require_variance=False, replay_groups=2, max_replays=3,
                                      retire_solved=False)

    full_cb = cb()
    full = fit(tiny_prepared, [full_cb], max_steps=5)

    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = tmp_path / "ckpt"
    first_cb = cb()
    fit(tiny_prepared, [first_cb, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)],
        max_steps=3, enable_checkpointing=True)  # stops after step 3, inside the hybrid phase (steps >= 2)
    resumed_cb = cb()
    L.seed_everything(0, verbose=False)
    module, data = build(tiny_prepared)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[resumed_cb],
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_dir / "last.ckpt"))

    for (name, a), b in zip(full.model.state_dict().items(), module.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {name} differs after resume")
    assert [(e["group"].prompt_id, e["group"].step, e["replays"]) for e in full_cb.buffer] == \
        [(e["group"].prompt_id, e["group"].step, e["replays"]) for e in resumed_cb.buffer]
    assert full_cb.totals == resumed_cb.totals


def test_module_unchanged_without_callback(tiny_prepared):
    a = fit(tiny_prepared, [], max_steps=2)
    b = fit(tiny_prepared, [L.Callback()], max_steps=2)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


def test_replayed_groups_reuse_their_stored_reference_logprobs(tiny_prepared, monkeypatch):
    """Fresh groups carry the reference log-probs of their step; replaying them needs no new reference pass,
    and the stored values equal a fresh reference pass over the same completions (the reference is frozen)."""
    spy = Spy()
    module = fit(tiny_prepared, [spy], max_steps=2)
    groups = [g for step in spy.groups for g in step]
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
    # stored rows wider than every real completion: trimmed like the policy's log-probs (to the longest one)
    import dataclasses

    def cut(g: RolloutGroup, n: int) -> RolloutGroup:
        keep = (torch.arange(g.completion_ids.size(1)) < n).float()  # [T]
        return dataclasses.replace(g, completion_mask=g.completion_mask * keep,
                                   behaviour_logprobs=g.behaviour_logprobs * keep,
                                   reference_logprobs=g.reference_logprobs * keep,
                                   advantages=torch.linspace(-1, 1, g.num_completions))

    mixed = [cut(groups[3], 3), cut(groups[4], 5)]
    stored = module.replay_inputs(mixed)
    loss_stored, _ = module.replay_loss(stored, {})
    recomputed = dict(stored, ref_logprobs=None)
    with torch.no_grad():
        recomputed["ref_logprobs"], _ = real(stored["prompt_ids"], stored["completion_ids"],
                                             stored["completion_mask"], reference=True)
    loss_fresh, _ = module.replay_loss(recomputed, {})
    torch.testing.assert_close(loss_stored, loss_fresh, atol=1e-6, rtol=1e-5)
    for g in groups[:3]:  # groups stored without them (an older buffer) still get a reference pass
        g.reference_logprobs = None
    calls.clear()
    module.replay_inputs(groups[:3])
    assert any(k.get("reference") for k in calls)
