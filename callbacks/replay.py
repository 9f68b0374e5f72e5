"""ReRULE: a replay buffer of hard-case rollout groups, reused through off-policy updates (Lightning glue).

The decisions live in :mod:`callbacks.buffer` (pure); this module wires them to the batch hooks. The contract
with the module is the one documented in :mod:`rerule_lightning.primitives.rollout`: fresh groups arrive as
``outputs["groups"]`` in ``on_train_batch_end``; stored groups leave as ``batch["replay"]`` (priority order,
``advantages`` set) with ``batch["replay_options"]`` in ``on_train_batch_start``; the module reports the
ones it trained on as ``outputs["replay_used"]`` and only those count as replayed.

Time is counted in **rollout batches** ``trainer.global_step // μ`` (μ = the module's ``num_iterations``:
Lightning counts every optimizer step in ``global_step``): ``collect_steps``, ``replay_start``, ``max_age`` and
the sampling seeds all use it, and fractions are of ``trainer.max_steps // μ``.

* Collection: every fresh group updates its label's running statistics (last ``window`` groups) and its
  prompt's moving average of group means (EMA, ``prompt_momentum``); while collecting (always, or for the first
  ``collect_steps`` batches), :meth:`admissible` groups are stored, at most one per prompt (the newer replaces
  the older), at most ``capacity``.
* Replay starts at batch ``replay_start`` or, with ``adaptive``, after the first batch at which some label's
  window is full and its fraction of zero-variance groups reaches ``adaptive_threshold``.
* Spending: ``add`` offers ``replay_groups`` stored groups per rank per step, all trained on besides the fresh
  ones; ``fill`` offers up to ``replay_groups`` (``null``: the local batch size) and the module uses one per
  fresh zero-variance group, leaving those out (compute-neutral).
* Sampling: ``priority`` weights, without replacement, from a generator seeded by ``(seed, batch)``; under
  DDP one global draw is split so ranks get disjoint groups, and every rank applies every rank's admissions
  and replays, so all ranks hold the identical buffer.
* Leaving: after ``max_replays`` replays, older than ``max_age`` batches, beyond ``capacity`` (lowest priority
  first), or retired (:meth:`retire`).
* Advantages of replayed groups: ``group`` (stored at collection) or ``running``
  (:func:`callbacks.buffer.running_advantages`: on the fresh scale, and non-zero for zero-variance groups).
"""

from typing import Annotated, Literal

from callbacks.buffer import Entry, Hardness, option_errors
from callbacks.replay_base import ReplayCallback
from rerule_lightning.primitives.ranges import (
    NULL,
    CollectSteps,
    Count,
    CountOrNull,
    NonNegative,
    Positive,
    Range,
    ReplayStart,
    UnitAboveZero,
    UnitBelowOne,
    UnitOpen,
    range_errors,
)
from rerule_lightning.primitives.rollout import RolloutGroup

#: One threshold for every label, or one per label.
Threshold = Annotated[float | dict[str, float] | None, Range(0, 1, special=NULL)]

__all__ = ["HardCaseReplayCallback", "RandomReplayCallback", "ReplayCallback"]


class HardCaseReplayCallback(ReplayCallback):
    """ReRULE: stores hard rollout groups (label-relative) and replays them with an off-policy correction.

    Args:
        hardness: ``margin`` (mean < label running mean − ``margin``) or ``quantile`` (mean in the label's lowest
            ``quantile`` of recent group means, and below the label's running mean). :mod:`callbacks.buffer`.
        margin: For ``hardness: margin``.
        quantile: For ``hardness: quantile``, in (0, 1).
        reward_threshold: Absolute thresholds (mean ≤ threshold is hard) replacing the rule: one float for
            every label, or ``{label: float}`` for some labels; ``None``: the rule for every label.
        window: Recent fresh groups per label behind its running mean, std, quantiles and zero-variance fraction.
        prompt_momentum: EMA momentum of each prompt's moving average of fresh group means (weight of the past).
        retire_solved: Retire a stored prompt once its moving average is no longer hard.
        collect_steps: Admit only in the first this many rollout batches (count, or fraction of the run);
            ``None``: collect throughout.
        replay_start: First rollout batch that replays (count or fraction), or ``adaptive`` (see
            ``adaptive_threshold``).
        adaptive_threshold: ``adaptive`` start: a label's fraction of zero-variance groups over a full window.
        spend: ``add`` (stored groups added to the step) or ``fill`` (they take the slots of fresh zero-variance
            groups, which are left out; at most B·G sequences per step).
        replay_groups: Stored groups offered per rank per step (``fill``: at most; ``null`` = local batch size).
        capacity: Most groups held (one per prompt).
        priority_exponent: α in priority = (gap + 0.05)^α / (1 + replays of the prompt)^``replay_penalty``,
            gap = how far the prompt's moving average lies below its label's running mean (or threshold).
        replay_penalty: Exponent of the few-replays factor of the priority.
        max_replays: Times a stored group may be replayed before it leaves.
        max_age: Evict groups sampled more than this many rollout batches ago (``None`` = never).
        correction: ``truncated`` (−sg(min(ρ, c̄))·A·log π), ``clipped`` (PPO surrogate against the behaviour
            policy, with the module's dual clip) or ``none`` (ρ ≡ 1, the naive ablation).
        is_level: Importance ratio per ``token`` or per ``sequence`` (geometric mean of token ratios).
        is_cap: c̄, the truncation cap of ``truncated``.
        advantages: ``running`` ((r − label mean) / label std, fresh scale; zero-variance groups admitted) or
            ``group`` (stored group-normalised advantages; zero-variance groups refused), or one per label,
            e.g. ``{forget: running, boundary: group}`` (``*``: the other labels; unlisted: ``group``).
        advantage_std_floor: Least label std used by ``running`` advantages.
        replay_loss_weight: Per-token weight of replayed tokens under the shared normaliser (module docstring).
        require_variance: Refuse zero-variance groups (``None``: exactly for labels whose advantages are ``group``).
        labels: Prompt labels that may be admitted (``None`` = all), e.g. ``[boundary]``.
        balance_labels: Equal replay quotas per label, and ``fill`` slots filled only by stored groups of the
            fresh group's own label, so replay keeps the batches' 1:1 forget/boundary mix (off: priority alone).
        seed: Seed of replay sampling.
    """

    def __init__(self, hardness: Literal["margin", "quantile"] = "margin", margin: NonNegative = 0.1,
                 quantile: UnitOpen = 0.25, reward_threshold: Threshold = None, window: Count = 64,
                 prompt_momentum: UnitBelowOne = 0.5, retire_solved: bool = True, collect_steps: CollectSteps = None,
                 replay_start: ReplayStart = 0.1, adaptive_threshold: UnitAboveZero = 0.5,
                 spend: Literal["add", "fill"] = "fill", replay_groups: CountOrNull = None, capacity: Count = 256,
                 priority_exponent: NonNegative = 1.0, replay_penalty: NonNegative = 1.0, max_replays: Count = 3,
                 max_age: CountOrNull = None, correction: Literal["truncated", "clipped", "none"] = "truncated",
                 is_level: Literal["token", "sequence"] = "token", is_cap: Positive = 2.0,
                 advantages: Literal["group", "running"] | dict[str, Literal["group", "running"]] = "group",
                 advantage_std_floor: Positive = 0.1, replay_loss_weight: NonNegative = 1.0,
                 require_variance: bool | None = None, labels: list[str] | None = None, balance_labels: bool = True,
                 seed: int = 0) -> None:
        errors = range_errors(type(self), locals())
        if hardness not in ("margin", "quantile"):
            errors.append(f"hardness={hardness!r}: choose margin or quantile")
        errors += option_errors(correction, is_level)
        super().__init__(collect_steps=collect_steps, replay_start=replay_start,
                         adaptive_threshold=adaptive_threshold, window=window, prompt_momentum=prompt_momentum,
                         spend=spend, replay_groups=replay_groups, capacity=capacity, max_replays=max_replays,
                         max_age=max_age, advantages=advantages, advantage_std_floor=advantage_std_floor,
                         require_variance=require_variance, labels=labels, seed=seed, errors=errors,
                         balance_labels=balance_labels,
                         options={"correction": correction, "level": is_level, "cap": is_cap,
                                  "weight": replay_loss_weight})
        thresholds = {} if reward_threshold is None else (
            {"*": float(reward_threshold)} if isinstance(reward_threshold, (int, float)) else
            {k: float(v) for k, v in reward_threshold.items()})
        self.hardness = Hardness(hardness, margin, quantile, thresholds)
        self.priority_exponent, self.replay_penalty = priority_exponent, replay_penalty
        self.retire_solved = retire_solved

    def hard(self, value: float, label: str) -> bool:
        return self.hardness.is_hard(value, label, self.stats)

    def admissible(self, group: RolloutGroup) -> bool:
        """Hard by its own mean, and its prompt's moving average hard too (no storing a usually solved prompt
        for one unlucky group); plus the base rules (label filter, replayable, variance)."""
        return (super().admissible(group) and self.hard(float(group.rewards.float().mean()), group.label)
                and self.hard(self.success[group.prompt_id], group.label))

    def priority(self, entry: Entry) -> float:
        g = entry.group
        gap = self.hardness.gap(self.success.get(g.prompt_id, float(g.rewards.float().mean())), g.label, self.stats)
        replays = self.buffer.prompt_replays.get(g.prompt_id, 0)
        return (gap + 0.05) ** self.priority_exponent / (1.0 + replays) ** self.replay_penalty

    def eviction_key(self, entry: Entry) -> tuple[float, ...]:
        return (self.priority(entry), float(entry.group.step))

    def retire(self, entry: Entry) -> bool:
        g = entry.group
        return self.retire_solved and not self.hard(self.success.get(g.prompt_id, 1.0), g.label)


class RandomReplayCallback(ReplayCallback):
    """Ablation: replay independent of hardness. Every fresh group (one per prompt, the newest) is stored while
    collecting, sampling is uniform, the oldest leave first beyond capacity, and nothing retires on a reward
    rule; spending, correction and advantages are those of :class:`HardCaseReplayCallback`, so the comparison
    isolates the value of choosing *hard* groups.

    Args:
        window: Recent fresh groups per label behind ``running`` advantages and the ``adaptive`` start.
        collect_steps: Store only in the first this many rollout batches (count or fraction); ``None``: always.
        replay_start: First rollout batch that replays (count or fraction), or ``adaptive``.
        adaptive_threshold: ``adaptive`` start: a label's fraction of zero-variance groups over a full window.
        spend: ``add`` or ``fill`` (as :class:`HardCaseReplayCallback`).
        replay_groups: Stored groups offered per rank per step (``fill``: at most; ``null`` = local batch size).
        capacity: Most groups held (one per prompt); the oldest leave first.
        max_replays: Times a stored group may be replayed before it leaves.
        max_age: Evict groups sampled more than this many rollout batches ago (``None`` = never).
        correction: ``truncated``, ``clipped`` or ``none``.
        is_level: Importance ratio per ``token`` or per ``sequence``.
        is_cap: c̄, the truncation cap of ``truncated``.
        advantages: ``running`` or ``group``, or one per label (as :class:`HardCaseReplayCallback`).
        advantage_std_floor: Least label std used by ``running`` advantages.
        replay_loss_weight: Per-token weight of replayed tokens under the shared normaliser.
        require_variance: Refuse zero-variance groups (``None``: exactly for labels whose advantages are ``group``).
        labels: Prompt labels that may be stored (``None`` = all).
        balance_labels: Equal replay quotas per label (as :class:`HardCaseReplayCallback`).
        seed: Seed of replay sampling.
    """

    def __init__(self, window: Count = 64, collect_steps: CollectSteps = None, replay_start: ReplayStart = 0.1,
                 adaptive_threshold: UnitAboveZero = 0.5, spend: Literal["add", "fill"] = "fill",
                 replay_groups: CountOrNull = None, capacity: Count = 256, max_replays: Count = 3,
                 max_age: CountOrNull = None, correction: Literal["truncated", "clipped", "none"] = "truncated",
                 is_level: Literal["token", "sequence"] = "token", is_cap: Positive = 2.0,
                 advantages: Literal["group", "running"] | dict[str, Literal["group", "running"]] = "group",
                 advantage_std_floor: Positive = 0.1, replay_loss_weight: NonNegative = 1.0,
                 require_variance: bool | None = None, labels: list[str] | None = None, balance_labels: bool = True,
                 seed: int = 0) -> None:
        errors = range_errors(type(self), locals()) + option_errors(correction, is_level)
        super().__init__(collect_steps=collect_steps, replay_start=replay_start, balance_labels=balance_labels,
                         adaptive_threshold=adaptive_threshold, window=window, prompt_momentum=0.5, spend=spend,
                         replay_groups=replay_groups, capacity=capacity, max_replays=max_replays, max_age=max_age,
                         advantages=advantages, advantage_std_floor=advantage_std_floor,
                         require_variance=require_variance, labels=labels, seed=seed,
                         errors=errors,
                         options={"correction": correction, "level": is_level, "cap": is_cap,
                                  "weight": replay_loss_weight})


