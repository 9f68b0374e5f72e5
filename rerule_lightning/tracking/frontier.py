"""Methods compared at matched forgetting (DESIGN §3a): frontier points, constraints, the area, paired Δ vs RULE.

A **point** is one evaluated checkpoint of one run (a validation every 5 GRPO steps, an epoch of a baseline):
a mapping with ``select`` (metrics on the selection half, ``{"forget/refusal_rate": ..., ...}``), optionally
``report`` (the same checkpoint on the report half, filled in for chosen points only), ``sequences`` (sequences
forwarded and back-propagated up to it) and ``train_s`` (training seconds up to it), plus any identifying
fields (method, knob, value, step). Every function here is pure and reads only those fields.

* :func:`frontier`: the non-dominated points of two metrics (ties: the cheaper point, then the first);
* :func:`choose`: the best point under a :class:`Constraint` (highest selection-half same-family accuracy among
  the points that meet it and keep retain accuracy ≥ 0.90; ties: fewer sequences, then the first), or ``None``:
  "not reached", which the tables count and never drop;
* :func:`frontier_area`: the area under the staircase frontier of (forget refusal, same-family accuracy) over
  forget refusal ∈ [0.8, 1], divided by the interval's width (so it is in [0, 1]: the mean best same-family
  accuracy reachable at refusal ≥ r, over r); the same retain floor applies;
* :func:`paired_vs_reference`: per seed, method − RULE, with the 95 % t-interval of
  :func:`rerule_lightning.tracking.paired.t_interval` over the seeds where both reached the constraint, and the
  seeds where the method (or RULE) did not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rerule_lightning.tracking.paired import PairedStat, t_interval

REFUSAL, FORGET_ACC = "forget/refusal_rate", "forget/answer_accuracy"
SAME_FAMILY, UNRELATED, RETAIN = "boundary_hard/answer_accuracy", "boundary_easy/answer_accuracy", "retain/answer_accuracy"
#: A collapsed model is not a frontier point: every constraint (and the area) also asks this of retain accuracy.
RETAIN_FLOOR = 0.90
AREA_RANGE = (0.8, 1.0)

Point = Mapping[str, Any]


@dataclass(frozen=True)
class Constraint:
    """A forgetting constraint, checked on the selection half: ``metric >= threshold`` (``op=">="``) or
    ``metric <= threshold`` (``op="<="``), and retain accuracy ``>= retain_floor``."""

    name: str
    metric: str
    op: str
    threshold: float
    retain_floor: float = RETAIN_FLOOR

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"Constraint {self.name!r}: op={self.op!r}: choose '>=' or '<='")

    def met(self, metrics: Mapping[str, float]) -> bool:
        """Whether ``metrics`` (one half's values of a point) meet the constraint (a missing value: no)."""
        v, r = metrics.get(self.metric, math.nan), metrics.get(RETAIN, math.nan)
        if not (math.isfinite(v) and math.isfinite(r)) or r < self.retain_floor:
            return False
        return v >= self.threshold if self.op == ">=" else v <= self.threshold


#: The three constraints fixed in advance (DESIGN §3a), in table order.
CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint("refusal ≥ 0.95", REFUSAL, ">=", 0.95),
    Constraint("refusal ≥ 0.90", REFUSAL, ">=", 0.90),
    Constraint("forget acc ≤ 0.05", FORGET_ACC, "<=", 0.05),
)


def _sel(p: Point, key: str) -> float:
    v = p["select"].get(key, math.nan)
    return float(v) if v is not None else math.nan


def _cost(p: Point) -> float:
    s = p.get("sequences")
    return float(s) if s is not None and math.isfinite(s) else math.inf


def frontier(points: Sequence[Point], x: str = REFUSAL, y: str = SAME_FAMILY, x_higher_is_better: bool = True,
             retain_floor: float | None = RETAIN_FLOOR) -> list[Point]:
    """The non-dominated points of (``x``, ``y``) on the selection half, sorted by ``x`` from best to worst.

    ``y`` is always better higher; ``x`` as ``x_higher_is_better`` says (forget refusal: yes, forget accuracy:
    no). A point is dominated when another is at least as good on both and better on one. Points with equal
    (x, y) keep one: the fewest ``sequences``, then the first given. Points below ``retain_floor`` (or with a
    missing value) are left out.
    """
    sign = 1.0 if x_higher_is_better else -1.0
    ok = [(i, p) for i, p in enumerate(points)
          if math.isfinite(_sel(p, x)) and math.isfinite(_sel(p, y))
          and (retain_floor is None or _sel(p, RETAIN) >= retain_floor)]
    # best x first; at equal x best y first; then the cheaper, then the earlier
    ok.sort(key=lambda ip: (-sign * _sel(ip[1], x), -_sel(ip[1], y), _cost(ip[1]), ip[0]))
    out: list[Point] = []
    best_y = -math.inf
    for _, p in ok:
        if _sel(p, y) > best_y:
            out.append(p)
            best_y = _sel(p, y)
    return out


def choose(points: Sequence[Point], constraint: Constraint, y: str = SAME_FAMILY) -> Point | None:
    """The point with the highest selection-half ``y`` among those meeting ``constraint`` (ties: fewer
    ``sequences``, then the first given); ``None`` when no point meets it ("not reached")."""
    ok = [(i, p) for i, p in enumerate(points) if constraint.met(p["select"]) and math.isfinite(_sel(p, y))]
    if not ok:
        return None
    return min(ok, key=lambda ip: (-_sel(ip[1], y), _cost(ip[1]), ip[0]))[1]


def closest(points: Sequence[Point], retain_floor: float = RETAIN_FLOOR, y: str = SAME_FAMILY) -> Point | None:
    """For a method that reaches no constraint: the point with the lowest selection-half forget accuracy among
    those with retain accuracy ``>= retain_floor`` (ties: as :func:`choose`, the higher ``y``, then fewer
    ``sequences``, then the first given); ``None`` when no point keeps retain accuracy. The same as
    :func:`choose` under ``forget acc ≤ (that lowest value)``, so it is not a matched point: its forget accuracy is
    what the method gets to, whatever that is."""
    accs = [a for p in points if _sel(p, RETAIN) >= retain_floor and math.isfinite(a := _sel(p, FORGET_ACC))]
    if not accs:
        return None
    lowest = min(accs)
    return choose(points, Constraint(f"forget acc ≤ {lowest:.3f} (closest)", FORGET_ACC, "<=", lowest, retain_floor), y)


def best_at(points: Sequence[Point], r: float, x: str = REFUSAL, y: str = SAME_FAMILY,
            retain_floor: float | None = RETAIN_FLOOR, x_higher_is_better: bool = True) -> float:
    """The frontier's staircase at ``r``: the best ``y`` among points with ``x >= r`` (``x <= r`` when lower ``x`` is
    better, e.g. forget accuracy), 0 when there is none."""
    def meets(v: float) -> bool:
        return v >= r if x_higher_is_better else v <= r

    ys = [_sel(p, y) for p in points if meets(_sel(p, x)) and math.isfinite(_sel(p, y))
          and (retain_floor is None or _sel(p, RETAIN) >= retain_floor)]
    return max(ys, default=0.0)


def frontier_area(points: Sequence[Point], lo: float = AREA_RANGE[0], hi: float = AREA_RANGE[1],
                  x: str = REFUSAL, y: str = SAME_FAMILY, retain_floor: float | None = RETAIN_FLOOR) -> float:
    """``(1 / (hi − lo)) ∫_lo^hi best_at(r) dr``: the normalised area under the staircase frontier.

    ``best_at`` is a non-increasing step function of ``r`` that changes only at the points' ``x`` values, so the
    integral is exact: a sum over the intervals between consecutive breakpoints, each valued at its right end
    (``best_at`` is left-continuous: at ``r`` a point with ``x = r`` still counts).
    """
    if not hi > lo:
        raise ValueError(f"frontier_area: need hi > lo, got [{lo}, {hi}]")
    cuts = sorted({lo, hi, *(_sel(p, x) for p in points if lo < _sel(p, x) < hi)})
    area = math.fsum((b - a) * best_at(points, b, x, y, retain_floor) for a, b in zip(cuts, cuts[1:]))
    return area / (hi - lo)


def compute_of(point: Point | None) -> dict[str, float]:
    """The chosen point's compute: sequences forwarded + back-propagated and training seconds (``nan`` if none)."""
    if point is None:
        return {"sequences": math.nan, "train_s": math.nan}
    return {"sequences": float(point.get("sequences", math.nan)), "train_s": float(point.get("train_s", math.nan))}


@dataclass(frozen=True)
class PairedFrontier:
    """A method against the reference (RULE) on one statistic, seed by seed."""

    stat: PairedStat | None
    deltas: dict[int, float]
    method_missing: list[int]
    reference_missing: list[int]


def paired_vs_reference(method: Mapping[int, float | None], reference: Mapping[int, float | None]) -> PairedFrontier:
    """Per-seed ``method − reference`` (both ``{seed: value}``, ``None``/``nan`` = not reached) over the seeds both
    reached, with its 95 % t-interval (``None`` when no seed is paired), and the seeds each side did not reach."""
    def reached(v: float | None) -> bool:
        return v is not None and math.isfinite(v)

    seeds = sorted(set(method) | set(reference))
    deltas = {s: float(method[s]) - float(reference[s]) for s in seeds
              if reached(method.get(s)) and reached(reference.get(s))}
    return PairedFrontier(t_interval(list(deltas.values())) if deltas else None, deltas,
                          [s for s in seeds if not reached(method.get(s))],
                          [s for s in seeds if not reached(reference.get(s))])


def per_seed(points: Sequence[Point], statistic: Callable[[Sequence[Point]], float | None],
             seed_key: str = "seed") -> dict[int, float | None]:
    """``statistic`` of each seed's points: ``{seed: value}``."""
    by: dict[int, list[Point]] = {}
    for p in points:
        by.setdefault(int(p[seed_key]), []).append(p)
    return {s: statistic(ps) for s, ps in sorted(by.items())}


__all__ = ["AREA_RANGE", "CONSTRAINTS", "Constraint", "FORGET_ACC", "PairedFrontier", "REFUSAL", "RETAIN",
           "RETAIN_FLOOR", "SAME_FAMILY", "UNRELATED", "best_at", "choose", "closest", "compute_of", "frontier",
           "frontier_area", "paired_vs_reference", "per_seed"]
