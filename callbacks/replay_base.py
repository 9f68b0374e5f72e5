"""The shared machinery of the replay callbacks (schedule, sampling, DDP, accounting, checkpoint); the
ReRULE callback and its ablations (:mod:`callbacks.replay`, :mod:`callbacks.prompt_replay`) subclass it.

See :mod:`callbacks.replay` for the contract with the module and the schedule.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import lightning as L
import torch

from callbacks.buffer import (
    Entry,
    LabelStats,
    ReplayBuffer,
    Schedule,
    advantage_checks,
    resolve_schedule,
    running_advantages,
    schedule_errors,
    zero_variance,
)
from rerule_lightning.primitives.rollout import RolloutGroup


class ReplayCallback(L.Callback):
    """Shared machinery of the replay callbacks (schedule, sampling, DDP, accounting, checkpoint).

    Subclasses decide :meth:`admissible`, :meth:`priority`, :meth:`retire` and :meth:`deliver`. Arguments: see
    :class:`HardCaseReplayCallback`.
    """

    needs_rows = False  # whether entries keep the prompt's batch row (prompt replay)
    reuses_rollouts = True  # whether stored rollouts are trained on again (they need behaviour log-probs)

    def __init__(self, *, collect_steps: Schedule, replay_start: Schedule | str, adaptive_threshold: float,
                 window: int, prompt_momentum: float, spend: str, replay_groups: int | None, capacity: int,
                 max_replays: int, max_age: int | None, advantages: str | dict[str, str],
                 advantage_std_floor: float,
                 require_variance: bool | None, labels: list[str] | None, seed: int, options: dict[str, Any],
                 errors: list[str] | None = None, balance_labels: bool = True) -> None:
        errors = list(errors or [])
        errors += schedule_errors(collect_steps, "collect_steps") + schedule_errors(replay_start, "replay_start")
        # the numeric ranges are in the concrete callbacks' signatures, checked there (range_errors)
        checks = [(spend in ("add", "fill"), f"spend={spend!r}: choose add or fill"),
                  (not (spend == "add" and replay_groups is None), "replay_groups=null: only with spend: fill"),
                  *advantage_checks(advantages)]
        errors += [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(errors))
        self.collect_steps_arg, self.replay_start_arg = collect_steps, replay_start
        self.adaptive_threshold, self.prompt_momentum = adaptive_threshold, prompt_momentum
        self.spend, self.replay_groups = spend, replay_groups
        self.max_replays, self.max_age = max_replays, max_age
        self.advantage_mode, self.advantage_std_floor = advantages, advantage_std_floor
        self.require_variance = require_variance
        self.labels = None if labels is None else set(labels)
        self.balance_labels = balance_labels
        self.seed, self.options = seed, {"spend": spend, "match_labels": balance_labels, **options}
        self.buffer = ReplayBuffer(capacity)
        self.stats = LabelStats(window)
        self.success: dict[str, float] = {}  # per prompt: EMA of its fresh group means
        self.collect_end: int | None = None
        self.replay_from: int | None = None  # resolved replay_start; adaptive: set once it triggers
        self.resolved = False
        self.mu = 1
        self._batch, self._offered = 0, [[]]  # this step's rollout batch; entry indices offered to each rank

    # ------------------------------------------------------------- decisions (subclasses)
    def admissible(self, group: RolloutGroup) -> bool:
        """Whether a fresh group may be stored (label filter, replayable, variance rule)."""
        if self.labels is not None and group.label not in self.labels:
            return False
        if self.reuses_rollouts and group.behaviour_logprobs is None:  # left out of its step (fill)
            return False
        return not (self.needs_variance(group.label) and zero_variance(group.rewards))

    def mode(self, label: str) -> str:
        """The advantage mode of a label: ``advantages`` itself, or its entry in the per-label mapping
        (``*`` the fallback, else ``group``)."""
        if isinstance(self.advantage_mode, str):
            return self.advantage_mode
        return self.advantage_mode.get(label, self.advantage_mode.get("*", "group"))

    def needs_variance(self, label: str) -> bool:
        """Whether a zero-variance group of this label is refused: ``require_variance``, or (``None``) exactly
        when the label's advantages are ``group`` (a zero-variance group has none)."""
        return self.mode(label) == "group" if self.require_variance is None else bool(self.require_variance)

    def priority(self, entry: Entry) -> float:
        """Sampling weight (> 0)."""
        return 1.0

    def eviction_key(self, entry: Entry) -> tuple[float, ...]:
        """Beyond capacity the lowest keys leave first (default: oldest first)."""
        return (float(entry.group.step),)

    def retire(self, entry: Entry) -> bool:
        """Whether a stored prompt is no longer worth replaying (default: never)."""
        return False

    def deliver(self, batch: dict[str, Any], entries: list[Entry]) -> None:
        """Put this rank's drawn entries into the batch (default: as ``batch["replay"]``)."""
        batch["replay"] = [self.with_advantages(e.group) for e in entries]
        batch["replay_options"] = dict(self.options)

    def with_advantages(self, g: RolloutGroup) -> RolloutGroup:
        """A copy of a stored group with its replay advantages (its label's mode: ``group`` or ``running``)."""
        if self.mode(g.label) == "group":
            adv = g.advantages if g.advantages is not None else torch.zeros_like(g.rewards)
        else:
            mean = self.stats.mean(g.label)
            mean = float(g.rewards.float().mean()) if mean is None else mean
            adv = running_advantages(g.rewards, mean, self.stats.std(g.label), self.advantage_std_floor)
        return RolloutGroup(**{**g.to_state(), "advantages": adv.float()})

    # ------------------------------------------------------------- schedule
    def collecting(self, batch: int) -> bool:
        return self.collect_end is None or batch < self.collect_end

    def replaying(self, batch: int) -> bool:
        return self.replay_from is not None and batch >= self.replay_from

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hp = getattr(pl_module, "hparams", {}) or {}
        self.mu = max(int(hp.get("num_iterations", 1) or 1), 1)
        if self.resolved:  # a restored state keeps its resolved schedule
            return
        total = trainer.max_steps // self.mu if trainer.max_steps is not None and trainer.max_steps > 0 else None
        self.collect_end = resolve_schedule(self.collect_steps_arg, total, "collect_steps")
        if self.replay_start_arg != "adaptive":
            self.replay_from = resolve_schedule(self.replay_start_arg, total, "replay_start")
        self.resolved = True

    # ------------------------------------------------------------- hooks
    def _per_rank(self, batch: dict[str, Any], world: int) -> int:
        """Entries drawn for each rank this step."""
        if self.spend == "fill":
            return self.replay_groups or len(batch.get("prompt") or []) or 1
        return int(self.replay_groups)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        world, rank = max(trainer.world_size, 1), trainer.global_rank
        b = self._batch = trainer.global_step // self.mu
        self.buffer.tally.new_step()
        self._offered = [[] for _ in range(world)]
        self.buffer.evict_old(b, self.max_age, self.mu)
        if not self.replaying(b) or not len(self.buffer):
            return
        n_rank = self._per_rank(batch, world)
        chosen = self._draw(n_rank * world, self.seed * 1_000_003 + b)
        per = math.ceil(len(chosen) / world)
        self._offered = [chosen[r * per:(r + 1) * per] for r in range(world)]
        for i in chosen:
            self.buffer.tally.count("sampled", self.buffer.entries[i].group)
        self.deliver(batch, [self.buffer.entries[i] for i in self._offered[rank]])

    def _draw(self, n: int, seed: int) -> list[int]:
        """Entry indices offered this step, best first. With ``balance_labels`` every label seen in fresh groups
        gets an equal quota (``add``: ``ceil(n / labels)``; ``fill``: ``n``, since a slot is filled only by its own
        label), drawn by priority within the label and interleaved label by label, so replay keeps the 1:1
        forget/boundary mix of the fresh batches instead of skewing it towards the label with most hard groups."""
        entries = self.buffer.entries
        prio = [self.priority(e) for e in entries]
        if not self.balance_labels:
            return self.buffer.draw(prio, n, seed)
        labels = sorted(set(self.stats.rewards) | {e.group.label for e in entries})
        quota = n if self.spend == "fill" else math.ceil(n / max(len(labels), 1))
        per_label = []
        for k, label in enumerate(labels):
            idx = [i for i, e in enumerate(entries) if e.group.label == label]
            if not idx:
                continue
            sub = self.buffer.draw_among(idx, [prio[i] for i in idx], quota, seed + 7919 * (k + 1))
            per_label.append(sub)
        out = [i for tier in itertools.zip_longest(*per_label) for i in tier if i is not None]
        return out if self.spend == "fill" else out[:n]

    def used_indices(self, outputs: dict[str, Any], offered: list[int]) -> list[int]:
        """Indices (into this rank's offered entries) the step trained on."""
        return list(outputs.get("replay_used", range(len(offered))))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        out, b, rank = outputs or {}, self._batch, trainer.global_rank
        groups: list[RolloutGroup] = list(out.get("groups") or [])
        rows = _rows(batch, len(groups)) if self.needs_rows else [None] * len(groups)
        used = self.used_indices(out, self._offered[rank] if rank < len(self._offered) else [])
        parts = _gather(trainer, ([g.to_state() for g in groups], used, rows))
        replayed = [self._offered[r][i] for r, (_, u, _) in enumerate(parts) for i in u]
        ages = [b - self.buffer.entries[i].group.step // self.mu for i in replayed]
        self.buffer.mark_replayed(replayed, self.max_replays)
        fresh = [(RolloutGroup.from_state(s), row, self.is_revisit(r, k, len(gs)))
                 for r, (gs, _, rs) in enumerate(parts) for k, (s, row) in enumerate(zip(gs, rs))]
        self.observe([(g, revisit) for g, _, revisit in fresh], b)
        if self.collecting(b):
            for g, row, _ in fresh:
                if self.admissible(g):
                    self.buffer.put(Entry(self.stored(g), self.initial_replays(g), row))
        self.buffer.drop([not self.retire(e) for e in self.buffer.entries], "retired")
        self.buffer.evict_capacity([self.eviction_key(e) for e in self.buffer.entries])
        filled = len(replayed) if self.spend == "fill" else 0
        self.buffer.tally.add("filled", filled)
        log = {**self.buffer.tally.log(), **self.buffer.composition(),
               "replay/phase": float(self.replaying(b)), "replay/fill_fraction": filled / max(len(fresh), 1),
               "replay/zero_std_groups": float(sum(zero_variance(g.rewards) for g, _, _ in fresh)),
               "replay/mean_age": sum(ages) / len(ages) if ages else 0.0}
        pl_module.log_dict(log, on_step=True, on_epoch=False, batch_size=1)

    def is_revisit(self, rank: int, k: int, n: int) -> bool:
        """Whether rank ``rank``'s ``k``-th of ``n`` fresh groups re-samples a stored prompt (prompt replay)."""
        return False

    def initial_replays(self, group: RolloutGroup) -> int:
        """Replay count a newly stored group starts with (default 0: new rollouts, a new budget)."""
        return 0

    def stored(self, group: RolloutGroup) -> RolloutGroup:
        """What the buffer keeps of an admitted group (default: all of it)."""
        return group

    def observe(self, groups: list[tuple[RolloutGroup, bool]], batch: int) -> None:
        """Update label statistics (fresh draws only), prompt moving averages and the adaptive start."""
        m = self.prompt_momentum
        for g, revisit in groups:
            if not revisit:  # revisited prompts are a biased sample of their label
                self.stats.add(g.label, g.rewards)
            r, old = float(g.rewards.float().mean()), self.success.get(g.prompt_id)
            self.success[g.prompt_id] = r if old is None else m * old + (1 - m) * r
        if self.replay_start_arg == "adaptive" and self.replay_from is None:
            if any(self.stats.full(lab) and self.stats.zero_std_fraction(lab) >= self.adaptive_threshold
                   for lab in self.stats.rewards):
                self.replay_from = batch + 1

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (loads with ``torch.load(weights_only=True)``)."""
        state = self.buffer.state_dict()
        return {"buffer": state["entries"], "totals": state["totals"], "prompt_replays": state["prompt_replays"],
                "stats": self.stats.state_dict(), "success": dict(self.success), "collect_end": self.collect_end,
                "replay_from": self.replay_from, "resolved": self.resolved, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict({"entries": state["buffer"], "totals": state["totals"],
                                     "prompt_replays": state["prompt_replays"]})
        self.stats.load_state_dict(state["stats"])
        self.success = {k: float(v) for k, v in state["success"].items()}
        self.collect_end, self.replay_from = state["collect_end"], state["replay_from"]
        self.resolved, self.seed = bool(state["resolved"]), int(state["seed"])



def _rows(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The batch's n prompt rows (every per-prompt column), as plain dicts."""
    cols = [k for k, v in batch.items() if k not in ("replay", "replay_options") and isinstance(v, list) and len(v) == n]
    return [{k: batch[k][i] for k in cols} for i in range(n)]


def _gather(trainer: L.Trainer, payload: Any) -> list[Any]:
    """Every rank's payload, in rank order (identical on every rank); ``[payload]`` on one process."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [payload]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, payload)
    return gathered
