"""Replay callbacks under real trainer calls on the tiny prepared world (admission, one group per prompt,
schedule, ablations, resume), plus unit checks of the decisions that need a callback around them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks import HardCaseReplayCallback, PromptReplayCallback, RandomReplayCallback
from callbacks.buffer import Entry, LabelStats
from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.policy import PolicyConfig
from rerule_lightning.primitives.rollout import RolloutGroup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
KEY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_/.")


def make_group(prompt_id: str, rewards: list[float], step: int = 0, label: str = "boundary") -> RolloutGroup:
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
        self.prompts: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.groups.append(list(outputs["groups"]))
        self.replayed.append(len(batch.get("replay") or []))
        self.prompts.append(list(batch["id"]))


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
    module.trainer_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module


def overlay_args(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "replay" / name).read_text())["trainer"]["callbacks+"][0]["init_args"]


def test_same_family_boundary_groups_are_admitted_by_the_label_relative_rule(tiny_prepared):
    # margin 0: any group below its label's running mean is hard (with the default 0.1 whether a same-family group
    # qualifies within 10 steps depended on the sampled completions, hence on the machine and thread count)
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running",
                                replay_start=100, retire_solved=False, margin=0.0)  # window 64
    spy = Spy()
    fit(tiny_prepared, [cb, spy], max_steps=10)
    # the rule, recomputed from the groups the module returned: the step's groups enter their label's
    # statistics and their prompts' moving averages (momentum 0.5) first, then each is judged
    stats, ema, expected, admissions = LabelStats(64), {}, {}, 0
    for groups in spy.groups:
        for g in groups:
            stats.add(g.label, g.rewards)
            m = float(g.rewards.mean())
            ema[g.prompt_id] = m if g.prompt_id not in ema else 0.5 * ema[g.prompt_id] + 0.5 * m
        for g in groups:
            limit = stats.mean(g.label)  # margin 0
            if float(g.rewards.mean()) < limit and ema[g.prompt_id] < limit:
                expected[g.prompt_id] = g  # one per prompt: the newest
                admissions += 1
    stored = {e.group.prompt_id: e.group for e in cb.buffer.entries}
    assert {p: g.step for p, g in stored.items()} == {p: g.step for p, g in expected.items()}
    same_family = [g for g in stored.values() if g.kind == "boundary_hard"]
    assert same_family, "no same-family boundary group was stored"
    # ... among them groups the old absolute rule (mean <= 0.5 with non-zero variance) never stored: all
    # answers wrong (zero variance, here [0.5] * 4) or mostly wrong with one right (mean 0.625)
    old_rule_refuses = lambda g: float(g.rewards.mean()) > 0.5 or bool(g.rewards.min() == g.rewards.max())  # noqa: E731
    assert any(old_rule_refuses(g) for g in same_family)
    assert cb.buffer.tally.totals["admitted"] == admissions


def test_one_group_per_prompt_the_newest(tiny_prepared):
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running",
                                reward_threshold=1.0, replay_start=100, retire_solved=False)  # admit everything
    spy = Spy()
    module = fit(tiny_prepared, [cb, spy], max_steps=14)
    fresh = [g for groups in spy.groups for g in groups]
    last = {g.prompt_id: g.step for g in fresh}
    assert len(last) < len(fresh), "the test needs prompts that recur"
    ids = [e.group.prompt_id for e in cb.buffer.entries]
    assert len(ids) == len(set(ids)) == len(last)
    assert {e.group.prompt_id: e.group.step for e in cb.buffer.entries} == last
    totals = cb.buffer.tally.totals
    assert totals["admitted"] == len(fresh) and totals["replaced"] == len(fresh) - len(last)
    # run totals are logged, so the last logged values are the totals; the buffer composition too
    m = module.trainer_metrics
    assert m["replay/admitted_total"] == len(fresh) and m["replay/replaced_total"] == totals["replaced"]
    assert m["replay/buffer_size"] == len(last)
    assert m["replay/buffer_size_forget"] + m["replay/buffer_size_boundary"] == len(last)
    assert m["replay/buffer_size_kind_boundary_hard"] == sum(e.group.kind == "boundary_hard" for e in cb.buffer.entries)
    assert all(set(k) <= KEY_CHARS for k in m if k.startswith("replay/"))


def test_boundary_only_overlay_stores_boundary_groups(tiny_prepared):
    args = overlay_args("hard_case_boundary.yaml")
    assert args["labels"] == ["boundary"]
    cb = HardCaseReplayCallback(**{**args, "replay_start": 100, "advantages": "running"})  # zero-variance too
    fit(tiny_prepared, [cb], max_steps=10)
    assert len(cb.buffer) > 0 and cb.buffer.tally.totals.get("admitted_boundary", 0) > 0
    # with a threshold every forget group qualifies, and still none is stored
    cb = HardCaseReplayCallback(**{**args, "replay_start": 100, "reward_threshold": 1.0})
    spy = Spy()
    fit(tiny_prepared, [cb, spy], max_steps=3)
    assert any(g.label == "forget" for groups in spy.groups for g in groups)
    assert {e.group.label for e in cb.buffer.entries} == {"boundary"}
    assert cb.buffer.tally.totals.get("admitted_forget", 0) == 0


def test_zero_variance_admission_follows_the_advantages():
    flat, mixed = make_group("a", [0.0, 0.0, 0.0, 0.0]), make_group("b", [0.0, 0.5, 0.0, 0.0])
    context = [(make_group(f"c{i}", [1.0, 0.5, 1.0, 1.0]), False) for i in range(6)]
    for advantages, require, admits_flat in [("running", None, True), ("group", None, False),
                                              ("running", True, False)]:
        cb = HardCaseReplayCallback(spend="add", replay_groups=2,
                                    advantages=advantages, require_variance=require)
        cb.observe(context + [(flat, False), (mixed, False)], batch=0)
        assert cb.admissible(flat) is admits_flat and cb.admissible(mixed)
    left_out = make_group("d", [0.0, 0.0, 0.0, 0.0])
    left_out.behaviour_logprobs = None  # not forwarded in its step (fill): cannot be replayed
    cb.observe([(left_out, False)], batch=0)
    assert not HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running").admissible(left_out)
    # random replay: no hardness at all (the easy context groups qualify too)
    assert RandomReplayCallback(spend="add", replay_groups=2, advantages="running").admissible(context[0][0])


def test_advantages_per_label_admit_and_score_each_label_by_its_own_mode():
    """``{forget: running, boundary: group}``: an all-answer forget group (zero variance) is admitted and replayed
    with (r - forget mean) / forget std; a zero-variance boundary group is refused and a mixed one keeps its
    stored within-group advantages."""
    cb = HardCaseReplayCallback(spend="add", replay_groups=2,
                                advantages={"forget": "running", "boundary": "group"}, margin=0.1)
    f_ctx = [(make_group(f"f{i}", [1.0, 1.0, 1.0, 0.0], label="forget"), False) for i in range(6)]
    b_ctx = [(make_group(f"b{i}", [1.0, 1.0, 1.0, 1.0]), False) for i in range(6)]
    f_flat = make_group("fz", [0.0] * 4, label="forget")
    b_flat, b_mixed = make_group("bz", [0.0] * 4), make_group("bm", [0.0, 0.5, 0.0, 0.0])
    b_mixed.advantages = torch.tensor([-0.5, 1.5, -0.5, -0.5])
    cb.observe(f_ctx + b_ctx + [(f_flat, False), (b_flat, False), (b_mixed, False)], batch=0)
    assert cb.mode("forget") == "running" and cb.mode("boundary") == "group" and cb.mode("other") == "group"
    assert cb.admissible(f_flat) and not cb.admissible(b_flat) and cb.admissible(b_mixed)
    # forget window: 6 groups of [1, 1, 1, 0] and one of zeros: mean of group means (6 * 0.75) / 7, pooled std
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0] * 6 + [0.0] * 4)
    mean, std = 4.5 / 7, float(rewards.std())  # Bessel-corrected, as LabelStats
    assert cb.stats.mean("forget") == pytest.approx(mean) and cb.stats.std("forget") == pytest.approx(std, rel=1e-6)
    adv = cb.with_advantages(f_flat).advantages
    torch.testing.assert_close(adv, torch.full((4,), (0.0 - mean) / (std + 1e-4)))
    torch.testing.assert_close(cb.with_advantages(b_mixed).advantages, b_mixed.advantages)
    assert HardCaseReplayCallback(spend="add", replay_groups=2,
                                  advantages={"*": "running"}).mode("boundary") == "running"
    with pytest.raises(ValueError, match=r"advantages\['forget'\]='sometimes': choose group or running"):
        HardCaseReplayCallback(spend="add", replay_groups=2, advantages={"forget": "sometimes"})
    with pytest.raises(ValueError, match=r"advantages=\{\}"):
        HardCaseReplayCallback(spend="add", replay_groups=2, advantages={})


def test_retirement_uses_the_prompt_moving_average_not_one_group():
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running",
                                margin=0.1, prompt_momentum=0.5, window=64)
    context = [(make_group(f"c{i}", [0.5, 1.0, 1.0, 0.5]), False) for i in range(40)]  # label mean 0.75
    hard = make_group("p", [0.0, 0.0, 0.5, 0.0])  # mean 0.125
    cb.observe(context + [(hard, False)], batch=0)
    assert cb.admissible(hard)
    entry = Entry(hard)
    cb.observe([(make_group("p", [1.0] * 4, step=1), False)], batch=1)  # EMA 0.5625 < 0.75 - 0.1: still hard
    assert not cb.retire(entry), "one solved group retired the prompt"
    cb.observe([(make_group("p", [1.0] * 4, step=2), False)], batch=2)  # EMA 0.78: no longer hard
    assert cb.retire(entry)
    assert not HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running",
                                      retire_solved=False).retire(entry)


def test_priority_favours_low_running_success_and_few_replays():
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running", margin=0.1)
    context = [(make_group(f"c{i}", [1.0, 1.0, 1.0, 1.0]), False) for i in range(3)]
    lo, mid = make_group("lo", [0.0, 0.0, 0.0, 0.0]), make_group("mid", [0.5, 0.5, 0.5, 0.5])
    cb.observe(context + [(lo, False), (mid, False)], batch=0)  # label mean (3 + 0 + 0.5) / 5 = 0.7
    # (gap + 0.05)^1 / (1 + replays): gaps 0.7 and 0.2
    assert cb.priority(Entry(lo)) == pytest.approx(0.75) and cb.priority(Entry(mid)) == pytest.approx(0.25)
    cb.buffer.prompt_replays["lo"] = 2
    assert cb.priority(Entry(lo)) == pytest.approx(0.25)


def test_schedule_counts_rollout_batches_and_fractions(tiny_prepared):
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running",
                                collect_steps=0.6, replay_start=2, reward_threshold=1.0, max_replays=10,
                                retire_solved=False)
    spy = Spy()
    fit(tiny_prepared, [cb, spy], max_steps=5)
    assert cb.collect_end == 3 and cb.replay_from == 2
    assert spy.replayed == [0, 0, 2, 2, 2]
    assert all(e.group.step < 3 for e in cb.buffer.entries)  # nothing admitted after collect_steps
    assert cb.buffer.tally.totals["admitted"] == 12


def test_adaptive_start_once_a_label_window_is_mostly_zero_variance(tiny_prepared):
    # the unsteered tiny target never refuses: every forget group is all-zero, 2 per step; window 6 is full
    # after step 2, so replay starts at step 3
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running",
                                replay_start="adaptive", adaptive_threshold=0.9, window=6, reward_threshold=1.0)
    spy = Spy()
    fit(tiny_prepared, [cb, spy], max_steps=5)
    assert cb.replay_from == 3 and spy.replayed == [0, 0, 0, 2, 2]


def test_bad_arguments_name_the_parameter():
    for kwargs, name in [({"capacity": 0}, "capacity"), ({"correction": "x"}, "correction"),
                         ({"is_level": "x"}, "is_level"), ({"advantages": "x"}, "advantages"),
                         ({"replay_groups": 0}, "replay_groups"), ({"collect_steps": 2.5}, "collect_steps"),
                         ({"replay_start": "soon"}, "replay_start"), ({"spend": "x"}, "spend"),
                         ({"replay_groups": None}, "replay_groups"), ({"hardness": "x"}, "hardness"),
                         ({"quantile": 1.0}, "quantile"), ({"window": 0}, "window")]:
        with pytest.raises(ValueError, match=name):
            HardCaseReplayCallback(**{"spend": "add", "replay_groups": 2, **kwargs})
    HardCaseReplayCallback(spend="fill", replay_groups=None)  # null is valid with fill


def test_state_dict_round_trip_loads_with_weights_only(tmp_path):
    cb = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running")
    cb.collect_end, cb.replay_from, cb.resolved = 4, 2, True
    cb.observe([(make_group("p", [0.0, 0.5, 0.0, 0.0], 1), False)], batch=1)
    cb.buffer.put(Entry(make_group("p", [0.0, 0.5, 0.0, 0.0], 1), replays=1))
    torch.save(cb.state_dict(), tmp_path / "cb.pt")
    state = torch.load(tmp_path / "cb.pt", weights_only=True)
    other = HardCaseReplayCallback(spend="add", replay_groups=2, advantages="running")
    other.load_state_dict(state)
    assert (other.collect_end, other.replay_from, other.resolved) == (4, 2, True)
    assert other.success == {"p": 0.125} and other.stats.rewards == cb.stats.rewards
    assert torch.equal(other.buffer.entries[0].group.rewards, cb.buffer.entries[0].group.rewards)
    assert other.buffer.entries[0].replays == 1 and other.buffer.tally.totals == cb.buffer.tally.totals


def test_random_replay_stores_every_group_and_never_retires(tiny_prepared):
    cb = RandomReplayCallback(spend="add", replay_groups=2, advantages="running", replay_start=100)
    spy = Spy()
    fit(tiny_prepared, [cb, spy], max_steps=6)
    seen = {g.prompt_id: g.step for groups in spy.groups for g in groups}
    assert {e.group.prompt_id: e.group.step for e in cb.buffer.entries} == seen
    assert cb.buffer.tally.totals["retired"] == 0
    assert len({cb.priority(e) for e in cb.buffer.entries}) == 1  # uniform


def test_prompt_replay_resamples_stored_prompts_before_generation(tiny_prepared):
    cb = PromptReplayCallback(reward_threshold=1.0, replay_start=1, replay_groups=2)
    spy = Spy()
    sampled: list[int] = []
    module, data = build(tiny_prepared)
    real = module._sample
    module._sample = lambda prompts: sampled.append(len(prompts)) or real(prompts)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[cb, spy],
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert sampled == [4, 6, 6]  # two stored prompts appended to the batch, then generated for
    assert spy.replayed == [0, 0, 0]  # no stored rollout is reused
    revisited = [ids[4:] for ids in spy.prompts[1:]]
    assert all(len(r) == 2 for r in revisited) and all(len(g) == 6 for g in spy.groups[1:])
    assert cb.buffer.tally.totals["replayed"] == 4 == sum(cb.buffer.prompt_replays.values())
    assert sum(len(v) for v in cb.stats.rewards.values()) == 12  # revisits stay out of the label statistics
    assert all(e.row is not None and e.group.completion_ids.numel() == 0 for e in cb.buffer.entries)


def test_resume_inside_replay_phase_matches_uninterrupted_run(tiny_prepared, tmp_path):
    def cb() -> HardCaseReplayCallback:
        return HardCaseReplayCallback(spend="add", advantages="running",
                                      replay_start=2, reward_threshold=1.0, replay_groups=2, max_replays=3,
                                      retire_solved=False)

    full_cb = cb()
    full = fit(tiny_prepared, [full_cb], max_steps=5)

    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = tmp_path / "ckpt"
    fit(tiny_prepared, [cb(), ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)],
        max_steps=3, enable_checkpointing=True)  # stops after step 3, inside the replay phase (steps >= 2)
    resumed_cb = cb()
    L.seed_everything(0, verbose=False)
    module, data = build(tiny_prepared)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[resumed_cb],
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_dir / "last.ckpt"))

    for (name, a), b in zip(full.model.state_dict().items(), module.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {name} differs after resume")
    assert full_cb.state_dict()["totals"]["replayed"] > 0
    key = lambda c: [(e.group.prompt_id, e.group.step, e.replays) for e in c.buffer.entries]  # noqa: E731
    assert key(full_cb) == key(resumed_cb)
    assert full_cb.buffer.tally.totals == resumed_cb.buffer.tally.totals
    assert full_cb.stats.rewards == resumed_cb.stats.rewards and full_cb.success == resumed_cb.success


def test_module_unchanged_without_callback(tiny_prepared):
    a = fit(tiny_prepared, [], max_steps=2)
    b = fit(tiny_prepared, [L.Callback()], max_steps=2)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


def test_class_defaults_are_the_shipped_default_overlay():
    """``class_path: callbacks.HardCaseReplayCallback`` without init_args is the selected default variant."""
    import inspect

    args = overlay_args("hard_case_fill.yaml")
    params = inspect.signature(HardCaseReplayCallback).parameters
    assert set(args) <= set(params)
    assert {k: params[k].default for k in args} == args
    assert args["spend"] == "fill" and args["advantages"] == "group" and args["replay_groups"] is None
