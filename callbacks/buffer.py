"""The replay buffer's decisions as plain Python (no Lightning): schedules, label statistics, hardness, running
advantages, one stored group per prompt, priorities, weighted sampling, eviction and the counts of what it did.

Everything here is deterministic and checkpoints as tensors and plain types (``state_dict`` / ``load_state_dict``),
so :mod:`callbacks.replay` only wires it to Lightning hooks and DDP.

Hardness is decided from rewards alone, relative to the prompt's *label* (``forget`` / ``boundary``):

* ``margin``: a group is hard when its mean reward is below its label's running mean by more than ``margin``;
* ``quantile``: when its mean is at most the ``quantile``-th quantile of its label's recent group means *and*
  below the label's running mean (so a label whose recent groups are all equal has no hard group);
* a per-label absolute ``threshold`` (mean ≤ threshold), where one is given, replaces the rule for that label.

The label's running statistics are those of its last ``window`` fresh groups.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from rerule_lightning.primitives.rollout import RolloutGroup

Schedule = int | float | None

EVENTS = ("admitted", "replaced", "sampled", "replayed", "retired", "evicted", "filled")


def resolve_schedule(value: Schedule, total: int | None, name: str) -> int | None:
    """A step count, or a fraction (0 < x < 1) of ``total`` rollout batches."""
    if value is None:
        return None
    if isinstance(value, float) and 0 < value < 1:
        if total is None:
            raise ValueError(f"{name}={value} is a fraction of trainer.max_steps, which is not set")
        return int(value * total)
    return int(value)


def option_errors(correction: str, is_level: str) -> list[str]:
    """Validation of the off-policy options shared by the callbacks that hand stored groups to the module (their
    numeric ranges, ``is_cap`` and ``replay_loss_weight``, are in the callbacks' signatures)."""
    checks = [(correction in ("truncated", "clipped", "none"), f"correction={correction!r}: choose truncated, "
                                                               "clipped or none"),
              (is_level in ("token", "sequence"), f"is_level={is_level!r}: choose token or sequence")]
    return [msg for ok, msg in checks if not ok]


ADVANTAGE_MODES = ("group", "running")


def advantage_checks(advantages: Any) -> list[tuple[bool, str]]:
    """Validation of ``advantages``: a mode, or a non-empty ``{label: mode}`` mapping."""
    if isinstance(advantages, str):
        return [(advantages in ADVANTAGE_MODES, f"advantages={advantages!r}: choose group or running, "
                                                "or {label: mode}")]
    if not isinstance(advantages, dict) or not advantages:
        return [(False, f"advantages={advantages!r}: choose group or running, or a non-empty {{label: mode}}")]
    return [(mode in ADVANTAGE_MODES, f"advantages[{label!r}]={mode!r}: choose group or running")
            for label, mode in advantages.items()]


def schedule_errors(value: Any, name: str) -> list[str]:
    """What the range of a schedule argument (``collect_steps`` / ``replay_start``) cannot say: a float >= 1 must
    be a whole count."""
    if isinstance(value, float) and value >= 1 and not value.is_integer():
        return [f"{name}={value!r}: give a count of rollout batches, a fraction in (0, 1)"
                + (", or adaptive" if name == "replay_start" else ", or null")]
    return []


def metric_name(value: Any) -> str:
    """A label or kind as a metric-key fragment (``[a-z0-9_]``)."""
    return re.sub(r"[^a-z0-9_]", "_", str(value).lower())


def zero_variance(rewards: torch.Tensor) -> bool:
    """Whether a group's rewards are all equal (exactly: no std rounding)."""
    return bool(rewards.max() == rewards.min())


def quantile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class LabelStats:
    """Per label, the rewards of its last ``window`` fresh groups (FIFO): running mean, std, quantiles.

    Args:
        window: Groups remembered per label.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.rewards: dict[str, list[list[float]]] = {}

    def add(self, label: str, rewards: torch.Tensor) -> None:
        """Remember one fresh group's ``[G]`` rewards."""
        xs = self.rewards.setdefault(label, [])
        xs.append([float(r) for r in rewards.float().tolist()])
        del xs[:-self.window]

    def group_means(self, label: str) -> list[float]:
        return [sum(r) / len(r) for r in self.rewards.get(label, [])]

    def mean(self, label: str) -> float | None:
        """Running mean of the label's recent group means (``None`` before its first group)."""
        means = self.group_means(label)
        return sum(means) / len(means) if means else None

    def std(self, label: str) -> float:
        """Bessel-corrected std of the label's recent *completion* rewards, pooled over its groups (0 if < 2)."""
        xs = [r for group in self.rewards.get(label, []) for r in group]
        if len(xs) < 2:
            return 0.0
        mu = sum(xs) / len(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))

    def zero_std_fraction(self, label: str) -> float:
        groups = self.rewards.get(label, [])
        return sum(max(g) == min(g) for g in groups) / len(groups) if groups else 0.0

    def full(self, label: str) -> bool:
        return len(self.rewards.get(label, [])) >= self.window

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "rewards": {k: [list(g) for g in v] for k, v in self.rewards.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self.rewards = {k: [list(g) for g in v] for k, v in state["rewards"].items()}


@dataclass(frozen=True)
class Hardness:
    """Which mean rewards count as hard for a label (module docstring).

    Attributes:
        rule: ``margin`` or ``quantile``.
        margin: For ``margin``.
        quantile: For ``quantile``, in (0, 1).
        thresholds: Absolute thresholds per label (``"*"`` for every label), replacing the rule where given.
    """

    rule: str = "margin"
    margin: float = 0.1
    quantile: float = 0.25
    thresholds: dict[str, float] = field(default_factory=dict)

    def threshold(self, label: str) -> float | None:
        return self.thresholds.get(label, self.thresholds.get("*"))

    def is_hard(self, value: float, label: str, stats: LabelStats) -> bool:
        """Whether a mean reward ``value`` is hard for ``label`` given the label's running statistics."""
        limit = self.threshold(label)
        if limit is not None:
            return value <= limit
        mu = stats.mean(label)
        if mu is None:
            return False
        if self.rule == "margin":
            return value < mu - self.margin
        return value <= quantile(stats.group_means(label), self.quantile) and value < mu

    def gap(self, value: float, label: str, stats: LabelStats) -> float:
        """How far ``value`` lies below the label's running mean (or threshold), floored at 0."""
        limit = self.threshold(label)
        ref = limit if limit is not None else stats.mean(label)
        return max((ref if ref is not None else value) - value, 0.0)


def running_advantages(rewards: torch.Tensor, mean: float, std: float, std_floor: float = 0.1,
                       eps: float = 1e-4) -> torch.Tensor:
    """Replayed advantages against the label's running baseline: (r − μ_label) / (max(σ_label, floor) + eps).

    σ_label is the pooled std of the label's recent completion rewards, so over the label's own recent
    groups these advantages have mean 0 and std ≈ 1, the within-group scale of fresh group-normalised
    advantages; zero-variance groups still get a signal. The floor keeps a label whose recent rewards are
    (nearly) constant from blowing up an older group's advantages.

    Args:
        rewards: ``[G]`` rewards of the stored group.
        mean: μ_label. std: σ_label. std_floor: Least σ used. eps: As in fresh group advantages.

    Returns:
        ``[G]`` float advantages.
    """
    return (rewards.float() - mean) / (max(std, std_floor) + eps)  # [G]


@dataclass
class Entry:
    """One stored group: at most one per prompt."""

    group: RolloutGroup
    replays: int = 0
    row: dict[str, Any] | None = None  # the prompt's batch row (prompt replay re-samples it)

    def to_state(self) -> dict[str, Any]:
        return {"group": self.group.to_state(), "replays": self.replays, "row": self.row}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Entry:
        return cls(RolloutGroup.from_state(state["group"]), int(state["replays"]), state.get("row"))


class Tally:
    """Counts of buffer events, overall, by label and by kind, for this step and for the run."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {e: 0 for e in EVENTS}
        self.step: dict[str, int] = {}

    def new_step(self) -> None:
        self.step = {}

    def count(self, event: str, group: RolloutGroup, n: int = 1) -> None:
        for key in (event, f"{event}_{metric_name(group.label)}", f"{event}_kind_{metric_name(group.kind)}"):
            self.totals[key] = self.totals.get(key, 0) + n
            self.step[key] = self.step.get(key, 0) + n

    def add(self, key: str, n: int) -> None:
        """Count ``n`` of an event that has no group breakdown (``filled``)."""
        self.totals[key] = self.totals.get(key, 0) + n
        self.step[key] = self.step.get(key, 0) + n

    def log(self) -> dict[str, float]:
        """``replay/<event>[_<label>|_kind_<kind>]`` for this step and ``replay/<event>_total...`` for the run."""
        out = {}
        for key, total in self.totals.items():
            event, sep, rest = key.partition("_")
            out[f"replay/{key}"] = float(self.step.get(key, 0))
            out[f"replay/{event}_total{sep}{rest}"] = float(total)
        return out


class ReplayBuffer:
    """Stored groups (one per prompt id, the newest), their replays and the run's counts.

    Args:
        capacity: Most entries held.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[Entry] = []
        self.tally = Tally()
        self.prompt_replays: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, entry: Entry) -> None:
        """Store ``entry``; an older entry of the same prompt is replaced (counted ``replaced``)."""
        pid = entry.group.prompt_id
        old = [e for e in self.entries if e.group.prompt_id == pid]
        for e in old:
            self.tally.count("replaced", e.group)
        self.entries = [e for e in self.entries if e.group.prompt_id != pid] + [entry]
        self.tally.count("admitted", entry.group)

    def drop(self, keep: list[bool], event: str) -> list[Entry]:
        """Remove the entries whose ``keep`` is False, counting them as ``event``."""
        gone = [e for e, k in zip(self.entries, keep) if not k]
        self.entries = [e for e, k in zip(self.entries, keep) if k]
        for e in gone:
            self.tally.count(event, e.group)
        return gone

    def evict_old(self, batch: int, max_age: int | None, mu: int) -> None:
        """Evict entries sampled more than ``max_age`` rollout batches before ``batch``."""
        if max_age is not None:
            self.drop([batch - e.group.step // mu <= max_age for e in self.entries], "evicted")

    def evict_capacity(self, keys: list[tuple[float, ...]]) -> None:
        """Beyond ``capacity``, evict the entries with the lowest ``keys`` (one sortable key per entry)."""
        if len(self.entries) <= self.capacity:
            return
        order = sorted(range(len(self.entries)), key=lambda i: keys[i], reverse=True)
        keep = set(order[: self.capacity])
        self.drop([i in keep for i in range(len(self.entries))], "evicted")

    def draw(self, priorities: list[float], n: int, seed: int) -> list[int]:
        """Up to ``n`` distinct entry indices, drawn with probability ∝ priority, best key first.

        Efraimidis-Spirakis: the top-n of u^(1/w) (here log(u)/w) is a weighted draw without replacement; the
        result is in descending key order, which is the order the module fills slots in.
        """
        n = min(n, len(self.entries))
        if n <= 0:
            return []
        w = torch.tensor(priorities, dtype=torch.float64)  # [N]
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(len(self.entries), generator=gen, dtype=torch.float64)  # [N]
        keys = torch.log(u) / w.clamp_min(1e-12)  # [N]
        return torch.argsort(keys, descending=True)[:n].tolist()

    def draw_among(self, indices: list[int], priorities: list[float], n: int, seed: int) -> list[int]:
        """:meth:`draw` restricted to the entries ``indices`` (with their ``priorities``); entry indices."""
        n = min(n, len(indices))
        if n <= 0:
            return []
        w = torch.tensor(priorities, dtype=torch.float64)  # [M]
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(len(indices), generator=gen, dtype=torch.float64)  # [M]
        keys = torch.log(u) / w.clamp_min(1e-12)  # [M]
        return [indices[j] for j in torch.argsort(keys, descending=True)[:n].tolist()]

    def mark_replayed(self, indices: list[int], max_replays: int) -> None:
        """Count one replay for each entry index; entries that reached ``max_replays`` are evicted."""
        for i in indices:
            e = self.entries[i]
            e.replays += 1
            self.prompt_replays[e.group.prompt_id] = self.prompt_replays.get(e.group.prompt_id, 0) + 1
            self.tally.count("replayed", e.group)
        self.drop([e.replays < max_replays for e in self.entries], "evicted")

    def composition(self) -> dict[str, float]:
        """``replay/buffer_size`` overall, by label and by kind (every label / kind seen stays logged)."""
        out = {"replay/buffer_size": float(len(self.entries))}
        for key in self.tally.totals:
            if key.startswith("admitted_"):
                out[f"replay/buffer_size_{key[len('admitted_'):]}"] = 0.0
        for e in self.entries:
            for k in (f"replay/buffer_size_{metric_name(e.group.label)}",
                      f"replay/buffer_size_kind_{metric_name(e.group.kind)}"):
                out[k] = out.get(k, 0.0) + 1.0
        out["replay/distinct_prompts_replayed"] = float(len(self.prompt_replays))
        out["replay/max_replays_one_prompt"] = float(max(self.prompt_replays.values(), default=0))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"entries": [e.to_state() for e in self.entries], "totals": dict(self.tally.totals),
                "prompt_replays": dict(self.prompt_replays)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [Entry.from_state(e) for e in state["entries"]]
        self.tally.totals = {k: int(v) for k, v in state["totals"].items()}
        self.prompt_replays = {k: int(v) for k, v in state["prompt_replays"].items()}
