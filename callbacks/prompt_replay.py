"""Prompt replay: the ablation that revisits stored hard prompts with *fresh* rollouts.

:class:`HardCaseReplayCallback` reuses stored rollouts (no generation, an off-policy correction);
:class:`PromptReplayCallback` stores the same hard prompts, chosen by the same rule, but in each replay step
appends ``replay_groups`` of them to the batch before generation, so the module samples, scores and trains on
new on-policy groups for them (it costs generation). Comparing the two separates "reusing the data" from
"revisiting the prompt".
"""

import dataclasses
from typing import Any, Literal

from callbacks.buffer import Entry
from callbacks.replay import HardCaseReplayCallback, Threshold
from rerule_lightning.primitives.ranges import (
    CollectSteps,
    Count,
    CountOrNull,
    NonNegative,
    ReplayStart,
    UnitAboveZero,
    UnitBelowOne,
    UnitOpen,
)
from rerule_lightning.primitives.rollout import RolloutGroup


class PromptReplayCallback(HardCaseReplayCallback):
    """Re-samples stored hard prompts: their batch rows are appended to the step's batch before generation.

    Admission, priority, retirement, schedule and capacity as :class:`HardCaseReplayCallback` (same argument
    names), except that zero-variance groups are stored by default (a new sample may vary) and no rollout is
    kept (only the prompt's row and its rewards). Revisited prompts are ordinary fresh groups for the module;
    they update their prompt's moving average (hence retirement) but not their label's running statistics
    (a biased sample of the label). Every rank appends the same number of prompts (DDP gathers equal shapes),
    so a step revisits ``min(replay_groups, buffer size // world size)`` prompts per rank. ``max_replays``
    counts a prompt's revisits, carried over when a revisit's group replaces the stored one.

    Args:
        hardness: ``margin`` or ``quantile`` (as :class:`HardCaseReplayCallback`).
        margin: For ``hardness: margin``.
        quantile: For ``hardness: quantile``, in (0, 1).
        reward_threshold: Absolute thresholds (float, or ``{label: float}``) replacing the rule.
        window: Recent fresh groups per label behind its running statistics.
        prompt_momentum: EMA momentum of each prompt's moving average of fresh group means.
        retire_solved: Retire a stored prompt once its moving average is no longer hard.
        collect_steps: Store only in the first this many rollout batches (count or fraction); ``None``: always.
        replay_start: First rollout batch that revisits (count or fraction), or ``adaptive``.
        adaptive_threshold: ``adaptive`` start: a label's fraction of zero-variance groups over a full window.
        replay_groups: Stored prompts appended per rank per replay step.
        capacity: Most prompts held.
        priority_exponent: α of the priority (as :class:`HardCaseReplayCallback`).
        replay_penalty: Exponent of the few-revisits factor of the priority.
        max_replays: Times a prompt may be revisited before it leaves.
        max_age: Evict prompts stored more than this many rollout batches ago (``None`` = never).
        require_variance: Refuse prompts whose group had zero reward variance.
        labels: Prompt labels that may be stored (``None`` = all).
        seed: Seed of the draw.
    """

    needs_rows = True
    reuses_rollouts = False

    def __init__(self, hardness: Literal["margin", "quantile"] = "margin", margin: NonNegative = 0.1,
                 quantile: UnitOpen = 0.25, reward_threshold: Threshold = None, window: Count = 64,
                 prompt_momentum: UnitBelowOne = 0.5, retire_solved: bool = True, collect_steps: CollectSteps = None,
                 replay_start: ReplayStart = 0.1, adaptive_threshold: UnitAboveZero = 0.5, replay_groups: Count = 2,
                 capacity: Count = 256, priority_exponent: NonNegative = 1.0, replay_penalty: NonNegative = 1.0,
                 max_replays: Count = 3, max_age: CountOrNull = None, require_variance: bool = False,
                 labels: list[str] | None = None, seed: int = 0) -> None:
        super().__init__(hardness=hardness, margin=margin, quantile=quantile, reward_threshold=reward_threshold,
                         window=window, prompt_momentum=prompt_momentum, retire_solved=retire_solved,
                         collect_steps=collect_steps, replay_start=replay_start,
                         adaptive_threshold=adaptive_threshold, spend="add", replay_groups=replay_groups,
                         capacity=capacity, priority_exponent=priority_exponent, replay_penalty=replay_penalty,
                         max_replays=max_replays, max_age=max_age, require_variance=require_variance,
                         labels=labels, seed=seed)
        self._revisits: list[int] = [0]

    def _per_rank(self, batch: dict[str, Any], world: int) -> int:
        return min(int(self.replay_groups), len(self.buffer) // world)

    def deliver(self, batch: dict[str, Any], entries: list[Entry]) -> None:
        """Append the stored prompts' rows to every per-prompt column of the batch."""
        for e in entries:
            for k, v in (e.row or {}).items():
                if isinstance(batch.get(k), list):
                    batch[k].append(v)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._revisits = [len(o) for o in self._offered]

    def used_indices(self, outputs: dict[str, Any], offered: list[int]) -> list[int]:
        return list(range(len(offered))) if outputs.get("groups") else []  # a skipped step trained on nothing

    def is_revisit(self, rank: int, k: int, n: int) -> bool:
        return rank < len(self._revisits) and k >= n - self._revisits[rank]

    def initial_replays(self, group: RolloutGroup) -> int:
        old = [e for e in self.buffer.entries if e.group.prompt_id == group.prompt_id]
        return old[0].replays if old else 0

    def stored(self, group: RolloutGroup) -> RolloutGroup:
        """Rewards and ids only: the rollouts are never trained on again."""
        empty = group.completion_ids[:, :0]
        return dataclasses.replace(group, completion_ids=empty, completion_mask=group.completion_mask[:, :0],
                                   behaviour_logprobs=None, reference_logprobs=None, completions=[])
