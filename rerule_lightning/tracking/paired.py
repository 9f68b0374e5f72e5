"""Paired comparisons across seeds: how a method is judged (DESIGN §3a).

Every variant runs on the same seeds as its baseline (same rejection-steered model, same prompt stream), so the
per-seed difference ``d_s = variant_s − baseline_s`` removes the seed's own effect. Over ``n`` seeds:

* mean difference ``d̄`` and its 95 % interval ``d̄ ± t_{0.975, n−1} · sd(d) / √n`` (Student t, sample sd
  with ddof = 1); with one seed the interval is undefined (``nan``);
* the ratio of paired wall-clocks ``variant_s / baseline_s`` summarised the same way (runs are interleaved,
  so slow drift of the machine cancels);
* "steps to reach": the first validation step at which a variant's curve reaches the baseline's final value
  of the same seed, censored at the budget (``None`` when never reached).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PairedStat:
    """Summary of per-seed paired differences (or ratios)."""

    n: int
    mean: float
    low: float
    high: float
    sd: float

    def excludes_zero(self) -> bool:
        """Whether the 95 % interval lies entirely above or below 0."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def t_interval(values: Sequence[float], level: float = 0.95) -> PairedStat:
    """Mean and two-sided ``level`` Student-t interval of ``values`` (non-finite values are dropped).

    Raises:
        ValueError: When no finite value is left.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        raise ValueError("t_interval: no finite values")
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return PairedStat(1, mean, math.nan, math.nan, math.nan)
    from scipy.stats import t

    sd = statistics.stdev(xs)
    half = float(t.ppf(0.5 + level / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return PairedStat(len(xs), mean, mean - half, mean + half, sd)


def paired_differences(variant: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """Per-seed ``variant − baseline`` over the seeds both have (sorted by seed)."""
    return {s: variant[s] - baseline[s] for s in sorted(set(variant) & set(baseline))}


def paired_ratios(variant: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """Per-seed ``variant / baseline`` over the seeds both have (wall-clock overhead)."""
    return {s: variant[s] / baseline[s] for s in sorted(set(variant) & set(baseline)) if baseline[s] > 0}


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step of ``curve`` (``(step, value)`` pairs, any order) whose value is ``>= target``;
    ``None`` when it never gets there (censored at the budget)."""
    for step, value in sorted(curve):
        if value >= target:
            return int(step)
    return None


def mean_over(curve: Sequence[tuple[int, float]], start: int, stop: int | None = None) -> float:
    """Mean of the values at steps ``start <= step < stop`` (``nan`` when there are none)."""
    vals = [v for s, v in curve if s >= start and (stop is None or s < stop) and math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


__all__ = ["PairedStat", "mean_over", "paired_differences", "paired_ratios", "steps_to_reach", "t_interval"]
