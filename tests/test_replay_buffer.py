"""callbacks.buffer without Lightning: label statistics, hardness rules, running advantages (their scale), one
entry per prompt, weighted sampling, eviction and the counts, against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks.buffer import (
    Entry,
    Hardness,
    LabelStats,
    ReplayBuffer,
    Tally,
    metric_name,
    quantile,
    running_advantages,
)
from rerule_lightning.primitives.rollout import RolloutGroup
from rerule_lightning.rl.grpo import group_advantages


def group(prompt_id: str, rewards: list[float], step: int = 0, label: str = "boundary",
          kind: str = "boundary_hard") -> RolloutGroup:
    g = len(rewards)
    return RolloutGroup(prompt_id=prompt_id, label=label, kind=kind, prompt_ids=torch.tensor([1, 5]),
                        completion_ids=torch.ones(g, 2, dtype=torch.long), completion_mask=torch.ones(g, 2),
                        behaviour_logprobs=-torch.ones(g, 2), rewards=torch.tensor(rewards), step=step,
                        advantages=torch.zeros(g))


WINDOW = [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]


def stats_of(groups: list[list[float]], window: int = 8, label: str = "boundary") -> LabelStats:
    s = LabelStats(window)
    for r in groups:
        s.add(label, torch.tensor(r))
    return s


def test_label_stats_by_hand() -> None:
    s = stats_of(WINDOW)
    # group means 0.5, 0.75, 1, 0 → mean 0.5625 (= the mean of the 16 completion rewards: 9/16)
    assert s.group_means("boundary") == [0.5, 0.75, 1.0, 0.0]
    assert s.mean("boundary") == pytest.approx(0.5625)
    # pooled Bessel std of the 16 rewards: 9 ones, 7 zeros: Σ(x − μ)² = 9·0.4375² + 7·0.5625² = 3.9375; /15
    assert s.std("boundary") == pytest.approx(math.sqrt(3.9375 / 15))
    assert s.zero_std_fraction("boundary") == 0.5  # [1, 1, 1, 1] and [0, 0, 0, 0]
    assert s.mean("forget") is None and s.std("forget") == 0.0 and not s.full("boundary")
    # FIFO window of 2 keeps the last two groups
    w2 = stats_of(WINDOW, window=2)
    assert w2.group_means("boundary") == [1.0, 0.0] and w2.full("boundary")
    restored = LabelStats(1)
    restored.load_state_dict(s.state_dict())
    assert restored.rewards == s.rewards and restored.window == 8


def test_quantile_interpolates_like_numpy() -> None:
    # sorted [0, 0.5, 0.75, 1]: q = 0.25 → position 0.75 → 0 + 0.75·0.5 = 0.375; q = 0.5 → 0.625
    assert quantile([0.5, 0.75, 1.0, 0.0], 0.25) == pytest.approx(0.375)
    assert quantile([0.5, 0.75, 1.0, 0.0], 0.5) == pytest.approx(0.625)
    assert quantile([0.3], 0.9) == 0.3


def test_hardness_margin_quantile_and_thresholds() -> None:
    s = stats_of(WINDOW)  # label mean 0.5625
    margin = Hardness("margin", margin=0.1)  # hard: < 0.4625
    assert [margin.is_hard(v, "boundary", s) for v in (0.0, 0.4375, 0.5, 0.5625)] == [True, True, False, False]
    assert not margin.is_hard(0.0, "forget", s), "no statistics for the label yet: nothing is hard"
    q = Hardness("quantile", quantile=0.25)  # ≤ 0.375 and < 0.5625
    assert [q.is_hard(v, "boundary", s) for v in (0.0, 0.375, 0.5)] == [True, True, False]
    flat = stats_of([[1.0] * 4] * 4)  # every recent group equal: no quantile group is hard
    assert not q.is_hard(1.0, "boundary", flat)
    per_label = Hardness("margin", margin=0.1, thresholds={"boundary": 0.6})
    assert per_label.is_hard(0.6, "boundary", s) and not per_label.is_hard(0.61, "boundary", s)
    everywhere = Hardness(thresholds={"*": 1.0})
    assert everywhere.is_hard(1.0, "forget", LabelStats(4))  # an absolute threshold needs no statistics
    assert margin.gap(0.0625, "boundary", s) == pytest.approx(0.5) and margin.gap(0.9, "boundary", s) == 0.0


def test_running_advantages_are_on_the_fresh_scale() -> None:
    s = stats_of(WINDOW)
    mu, sigma = s.mean("boundary"), s.std("boundary")  # 0.5625, sqrt(3.9375 / 15) ≈ 0.5123
    # the all-wrong zero-variance group: (0 − 0.5625) / (0.5123 + 1e-4) ≈ −1.098 for every completion
    flat = running_advantages(torch.zeros(4), mu, sigma)
    torch.testing.assert_close(flat, torch.full((4,), -0.5625 / (math.sqrt(3.9375 / 15) + 1e-4)))
    # over the label's own recent groups the replayed advantages have mean 0 and (Bessel) std σ/(σ + eps):
    # the within-group std of fresh group-normalised advantages, σ_g/(σ_g + eps), i.e. both ≈ 1
    pooled = torch.cat([running_advantages(torch.tensor(r), mu, sigma) for r in WINDOW])  # [16]
    assert abs(float(pooled.mean())) < 1e-6
    assert float(pooled.std()) == pytest.approx(sigma / (sigma + 1e-4), rel=1e-6)
    fresh = group_advantages(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))  # ±0.5 / (0.5774 + 1e-4)
    assert float(fresh.std()) == pytest.approx(float(pooled.std()), abs=1e-3)
    # a label whose recent rewards are constant uses the floor, not 1e-4
    torch.testing.assert_close(running_advantages(torch.zeros(2), 0.5, 0.0, std_floor=0.25),
                               torch.full((2,), -0.5 / (0.25 + 1e-4)))


def test_one_entry_per_prompt_newest_replaces_older() -> None:
    buf = ReplayBuffer(capacity=8)
    buf.put(Entry(group("p", [0.0, 0.5], step=1)))
    buf.put(Entry(group("q", [0.0, 0.5], step=1)))
    buf.put(Entry(group("p", [0.5, 0.5], step=4)))
    assert [(e.group.prompt_id, e.group.step) for e in buf.entries] == [("q", 1), ("p", 4)]
    assert buf.tally.totals["admitted"] == 3 and buf.tally.totals["replaced"] == 1


def test_draw_is_weighted_deterministic_and_distinct() -> None:
    buf = ReplayBuffer(capacity=8)
    for i in range(4):
        buf.put(Entry(group(f"p{i}", [0.0, 1.0])))
    a = buf.draw([1.0, 1.0, 1.0, 1.0], 3, seed=7)
    assert a == buf.draw([1.0, 1.0, 1.0, 1.0], 3, seed=7) and len(set(a)) == 3
    assert buf.draw([1.0] * 4, 10, seed=7).__len__() == 4
    # an overwhelming weight is drawn first in (almost) every seed
    firsts = [buf.draw([1e-6, 1e-6, 1.0, 1e-6], 1, seed=s)[0] for s in range(50)]
    assert firsts.count(2) >= 49


def test_replays_age_and_capacity_eviction() -> None:
    buf = ReplayBuffer(capacity=2)
    for i, step in enumerate([0, 2, 6]):
        buf.put(Entry(group(f"p{i}", [0.0, 1.0], step=step)))
    buf.evict_old(batch=3, max_age=2, mu=2)  # rollout batches 0, 1, 3: batch 0 is 3 > 2 batches old
    assert [e.group.prompt_id for e in buf.entries] == ["p1", "p2"]
    buf.mark_replayed([0], max_replays=2)
    buf.mark_replayed([0], max_replays=2)  # p1's second replay uses it up
    assert [e.group.prompt_id for e in buf.entries] == ["p2"] and buf.prompt_replays == {"p1": 2}
    for i in (3, 4):
        buf.put(Entry(group(f"p{i}", [0.0, 1.0], step=8)))
    buf.evict_capacity([(0.5,), (0.1,), (0.9,)])  # the lowest key (p3) leaves
    assert [e.group.prompt_id for e in buf.entries] == ["p2", "p4"]
    assert buf.tally.totals["evicted"] == 3  # 1 by age, 1 used up, 1 by capacity
    comp = buf.composition()
    assert comp["replay/buffer_size"] == 2 and comp["replay/buffer_size_kind_boundary_hard"] == 2
    assert comp["replay/distinct_prompts_replayed"] == 1 and comp["replay/max_replays_one_prompt"] == 2
    state = buf.state_dict()
    other = ReplayBuffer(2)
    other.load_state_dict(state)
    assert [e.group.prompt_id for e in other.entries] == ["p2", "p4"] and other.tally.totals == buf.tally.totals


def test_tally_logs_step_counts_and_run_totals_by_label_and_kind() -> None:
    t = Tally()
    t.count("admitted", group("a", [0.0], label="boundary", kind="boundary_hard"))
    t.new_step()
    t.count("admitted", group("b", [0.0], label="forget", kind="forget"))
    log = t.log()
    assert log["replay/admitted"] == 1 and log["replay/admitted_total"] == 2
    assert log["replay/admitted_boundary"] == 0 and log["replay/admitted_total_boundary"] == 1
    assert log["replay/admitted_total_kind_boundary_hard"] == 1 and log["replay/admitted_kind_forget"] == 1
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789_/.") for k in log)
    assert metric_name("Boundary-Hard 2") == "boundary_hard_2"


def test_balanced_draw_gives_each_label_its_quota() -> None:
    import torch as _t

    from callbacks import HardCaseReplayCallback
    from rerule_lightning.primitives.rollout import RolloutGroup as _G

    def group(pid: str, label: str) -> _G:
        return _G(prompt_id=pid, label=label, kind=label, prompt_ids=_t.tensor([1, 2]),
                  completion_ids=_t.zeros(2, 3, dtype=_t.long), completion_mask=_t.ones(2, 3),
                  behaviour_logprobs=_t.zeros(2, 3), rewards=_t.tensor([0.0, 0.5]), step=0)

    for spend, n, expect in (("add", 2, {"forget": 1, "boundary": 1}), ("fill", 3, {"forget": 1, "boundary": 3})):
        cb = HardCaseReplayCallback(advantages="running", spend=spend, replay_groups=n)
        from callbacks.buffer import Entry
        cb.buffer.entries = [Entry(group(f"b{i}", "boundary")) for i in range(5)] + [Entry(group("f0", "forget"))]
        cb.stats.add("forget", _t.tensor([0.0, 1.0]))
        cb.stats.add("boundary", _t.tensor([0.0, 1.0]))
        chosen = cb._draw(n, seed=3)
        labels = [cb.buffer.entries[i].group.label for i in chosen]
        assert {lab: labels.count(lab) for lab in set(labels)} == expect, spend
        assert len(set(chosen)) == len(chosen)
        unbalanced = HardCaseReplayCallback(advantages="running",
                                            spend=spend, replay_groups=n, balance_labels=False)
        assert unbalanced.options["match_labels"] is False and cb.options["match_labels"] is True
