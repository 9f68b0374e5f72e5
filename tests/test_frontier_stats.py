"""Frontier statistics on hand-made points: extraction, constraint selection (ties, not reached), the area,
paired Δ against RULE."""

from __future__ import annotations

import math

import pytest

from rerule_lightning.tracking.frontier import (
    CONSTRAINTS,
    Constraint,
    best_at,
    choose,
    closest,
    compute_of,
    frontier,
    frontier_area,
    paired_vs_reference,
    per_seed,
)


def pt(name: str, refusal: float, same: float, acc: float = 0.5, retain: float = 1.0, seq: int = 100,
       seed: int = 0) -> dict:
    return {"name": name, "seed": seed, "sequences": seq, "train_s": seq / 10,
            "select": {"forget/refusal_rate": refusal, "boundary_hard/answer_accuracy": same,
                       "forget/answer_accuracy": acc, "retain/answer_accuracy": retain}}


POINTS = [pt("a", 0.80, 0.90), pt("b", 0.90, 0.70), pt("c", 0.96, 0.50), pt("d", 0.85, 0.60),  # d dominated by b
          pt("e", 1.00, 0.40), pt("f", 0.99, 0.95, retain=0.80)]  # f: collapsed retain, never a point


def names(ps: list) -> list[str]:
    return [p["name"] for p in ps]


def test_frontier_drops_dominated_and_collapsed_points() -> None:
    assert names(frontier(POINTS)) == ["e", "c", "b", "a"]
    assert names(frontier(POINTS, retain_floor=None)) == ["e", "f"]   # without the floor f dominates all but e
    # x = forget accuracy, lower is better: (acc, same) = a (0.5, .9), b (.2, .7), c (.2, .75)
    ps = [pt("a", 0, 0.9, acc=0.5), pt("b", 0, 0.7, acc=0.2), pt("c", 0, 0.75, acc=0.2), pt("d", 0, 0.95, acc=0.6)]
    assert names(frontier(ps, x="forget/answer_accuracy", x_higher_is_better=False)) == ["c", "a", "d"]


def test_frontier_ties_keep_the_cheaper_then_the_first() -> None:
    ps = [pt("x", 0.9, 0.7, seq=300), pt("y", 0.9, 0.7, seq=200), pt("z", 0.9, 0.7, seq=200)]
    assert names(frontier(ps)) == ["y"]


def test_choose_under_each_constraint_with_ties_and_not_reached() -> None:
    r95, r90, acc05 = CONSTRAINTS
    assert choose(POINTS, r95)["name"] == "c"           # c (0.50) and e (0.40) reach 0.95; f fails retain
    assert choose(POINTS, r90)["name"] == "b"           # b 0.70 beats c, e
    assert choose(POINTS, acc05) is None                # nobody has forget accuracy <= 0.05: not reached
    ties = [pt("p", 0.97, 0.6, seq=500), pt("q", 0.95, 0.6, seq=200), pt("r", 0.99, 0.6, seq=200)]
    assert choose(ties, r95)["name"] == "q"             # equal same-family: fewer sequences, then the first
    edge = [pt("s", 0.95, 0.3, retain=0.90), pt("t", 0.9499, 0.9), pt("u", 1.0, 0.9, acc=0.05)]
    assert choose(edge, r95)["name"] == "u" and choose(edge[:2], r95)["name"] == "s"   # thresholds are inclusive
    assert choose(edge, acc05)["name"] == "u"
    assert not Constraint("x", "forget/refusal_rate", ">=", 0.5).met({"forget/refusal_rate": 1.0})  # no retain
    with pytest.raises(ValueError, match="op='>'"):
        Constraint("bad", "m", ">", 1.0)


def test_area_on_a_hand_made_curve() -> None:
    # staircase best_at(r) over [0.8, 1]: r <= 0.90 -> 0.70 (b), (0.90, 0.96] -> 0.50 (c), (0.96, 1] -> 0.40 (e)
    assert best_at(POINTS, 0.90) == 0.70 and best_at(POINTS, 0.91) == 0.50 and best_at(POINTS, 1.0) == 0.40
    expected = (0.10 * 0.70 + 0.06 * 0.50 + 0.04 * 0.40) / 0.2   # = 0.116 / 0.2 = 0.58
    assert frontier_area(POINTS) == pytest.approx(expected, abs=1e-12) and expected == pytest.approx(0.58)
    # a run that never refuses more than 0.9 gets 0 above it: 0.1 * 0.7 / 0.2 = 0.35
    assert frontier_area([pt("b", 0.90, 0.70)]) == pytest.approx(0.35, abs=1e-12)
    assert frontier_area([]) == 0.0 and frontier_area([pt("z", 0.5, 1.0)]) == 0.0
    assert frontier_area([pt("one", 1.0, 0.8)]) == pytest.approx(0.8, abs=1e-12)
    with pytest.raises(ValueError, match="hi > lo"):
        frontier_area(POINTS, 1.0, 0.8)


def test_paired_against_rule_counts_not_reached() -> None:
    method = {0: 0.6, 1: 0.7, 2: None, 3: 0.5}
    rule = {0: 0.5, 1: 0.5, 2: 0.6, 3: math.nan, 4: 0.4}
    out = paired_vs_reference(method, rule)
    assert out.deltas == {0: pytest.approx(0.1), 1: pytest.approx(0.2)}
    assert out.method_missing == [2, 4] and out.reference_missing == [3]
    # mean 0.15, sd 0.0707107, t_{0.975,1} = 12.7062047 -> half-width 12.7062 * 0.0707107 / sqrt 2 = 0.635310
    assert out.stat.mean == pytest.approx(0.15) and out.stat.high - 0.15 == pytest.approx(0.6353102, abs=1e-6)
    none = paired_vs_reference({0: None}, {0: 0.5})
    assert none.stat is None and none.method_missing == [0]


def test_per_seed_and_compute_of_the_chosen_point() -> None:
    ps = [pt("a", 1.0, 0.5, seed=0, seq=80), pt("b", 1.0, 0.6, seed=0, seq=160), pt("c", 0.5, 0.9, seed=1)]
    chosen = per_seed(ps, lambda xs: choose(xs, CONSTRAINTS[0]))
    assert chosen[0]["name"] == "b" and chosen[1] is None
    assert compute_of(chosen[0]) == {"sequences": 160.0, "train_s": 16.0}
    assert all(math.isnan(v) for v in compute_of(None).values())


def test_closest_is_the_lowest_forget_accuracy_that_keeps_retain() -> None:
    pts = [pt("a", 0.0, 0.90, acc=0.40), pt("b", 0.0, 0.70, acc=0.10), pt("c", 0.0, 0.80, acc=0.10),
           pt("d", 0.0, 0.95, acc=0.00, retain=0.60), pt("e", 0.0, 0.99, acc=0.30)]
    # d forgets most but collapsed retain; b and c tie at 0.10: the higher same-family wins
    assert closest(pts)["name"] == "c"
    assert closest(pts, retain_floor=0.5)["name"] == "d"
    tie = [pt("x", 0.0, 0.80, acc=0.10, seq=300), pt("y", 0.0, 0.80, acc=0.10, seq=200)]
    assert closest(tie)["name"] == "y"  # then the cheaper
    assert closest([pt("z", 0.0, 0.9, acc=0.0, retain=0.5)]) is None
    assert closest([]) is None
