"""ReRULE: a replay buffer of low-reward hard-case rollout groups, reused through off-policy updates.

``HardCaseReplayCallback`` owns admission, storage, sampling and eviction; the module computes the replayed
part of the loss (:meth:`GRPOUnlearningModule.replay_loss`). The contract is the one documented in
:mod:`rerule_lightning.rollout`: fresh groups arrive as ``outputs["groups"]`` in ``on_train_batch_end``;
replayed groups leave as ``batch["replay"]`` (with ``advantages`` set) and ``batch["replay_options"]`` in
``on_train_batch_start``. No group is ever re-generated.

Phases are decided by ``trainer.global_step``: **collect** while ``step < collect_steps``, then **hybrid**.

* Admission (collect phase only): a fresh group is hard if its mean reward ≤ ``reward_threshold`` and, with
  ``require_variance``, its rewards are not all equal (such a group has zero group advantage and no gradient).
  Under DDP every rank's admissions are gathered, so every rank holds the identical buffer.
* Storage: at most ``capacity`` groups; the lowest-priority (then oldest) group is evicted first. Priority
  is hardness^α with hardness = 1 − mean reward (rewards lie in [0, 1]). A group is dropped after
  ``max_replays`` replays, when it is older than ``max_age`` steps, or (``retire_solved``) as soon as a fresh
  group of the same prompt reaches the threshold.
* Sampling (hybrid phase): ``replay_groups`` groups per rank per step, without replacement, with probability
  proportional to priority, from a generator seeded by ``(seed, step)``; under DDP one global draw is split so
  ranks get disjoint groups.
* Advantages of replayed groups: their stored group-normalised advantages (``group``), or reward minus a
  per-label running mean of fresh rewards (``running``), which also gives zero-variance groups a signal.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch

from rerule_lightning.rollout import RolloutGroup


class HardCaseReplayCallback(L.Callback):
    """Stores hard rollout groups during early GRPO and replays them later with an off-policy correction.

    Args:
        collect_steps: End of the collect phase: a step count, or a fraction (< 1) of ``trainer.max_steps``.
        reward_threshold: A group is hard when its mean reward is at most this.
        require_variance: Refuse groups whose rewards are all equal.
        capacity: Most groups held.
        priority_exponent: α in priority = hardness^α (0 = uniform sampling among stored groups).
        max_replays: Times a group may be replayed before it is dropped.
        max_age: Drop groups sampled more than this many steps ago (``None`` = never).
        retire_solved: Drop a prompt's groups once a fresh group of that prompt reaches the threshold.
        replay_groups: Stored groups added to each hybrid step's batch (per rank).
        correction: Off-policy correction: ``truncated`` (−sg(min(ρ, c̄))·A·log π), ``clipped`` (PPO surrogate
            against the behaviour policy) or ``none`` (ρ ≡ 1, the naive ablation).
        is_level: Importance ratio per ``token`` or per ``sequence`` (geometric mean of token ratios).
        is_cap: c̄, the truncation cap of ``truncated``.
        advantages: ``group`` (stored, normalised at collection) or ``running`` (reward minus per-label running
            mean of fresh rewards).
        running_momentum: EMA momentum of the running baseline.
        replay_loss_weight: Weight of the replayed loss relative to the fresh one.
        labels: Prompt labels that may be admitted (``None`` = all).
        seed: Seed of replay sampling.
    """

    def __init__(self, collect_steps: int | float = 0.5, reward_threshold: float = 0.5, require_variance: bool = True,
                 capacity: int = 256, priority_exponent: float = 1.0, max_replays: int = 2,
                 max_age: int | None = None, retire_solved: bool = True, replay_groups: int = 2,
                 correction: Literal["truncated", "clipped", "none"] = "truncated",
                 is_level: Literal["token", "sequence"] = "token", is_cap: float = 2.0,
                 advantages: Literal["group", "running"] = "group", running_momentum: float = 0.9,
                 replay_loss_weight: float = 1.0, labels: list[str] | None = None, seed: int = 0) -> None:
        errors = []
        if isinstance(collect_steps, float) and collect_steps >= 1.0 and collect_steps != int(collect_steps):
            errors.append(f"collect_steps={collect_steps}: give a step count or a fraction in (0, 1)")
        if collect_steps < 0:
            errors.append(f"collect_steps={collect_steps}: must be >= 0")
        if capacity < 1:
            errors.append(f"capacity={capacity}: must be >= 1")
        if max_replays < 1:
            errors.append(f"max_replays={max_replays}: must be >= 1")
        if max_age is not None and max_age < 1:
            errors.append(f"max_age={max_age}: must be >= 1 or null")
        if replay_groups < 1:
            errors.append(f"replay_groups={replay_groups}: must be >= 1")
        if correction not in ("truncated", "clipped", "none"):
            errors.append(f"correction={correction!r}: choose truncated, clipped or none")
        if is_level not in ("token", "sequence"):
            errors.append(f"is_level={is_level!r}: choose token or sequence")
        if is_cap <= 0:
            errors.append(f"is_cap={is_cap}: must be > 0")
        if advantages not in ("group", "running"):
            errors.append(f"advantages={advantages!r}: choose group or running")
        if not 0.0 <= running_momentum < 1.0:
            errors.append(f"running_momentum={running_momentum}: must be in [0, 1)")
        if priority_exponent < 0:
            errors.append(f"priority_exponent={priority_exponent}: must be >= 0")
        if errors:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(errors))
        self.collect_steps_arg = collect_steps
        self.reward_threshold, self.require_variance = reward_threshold, require_variance
        self.capacity, self.priority_exponent = capacity, priority_exponent
        self.max_replays, self.max_age, self.retire_solved = max_replays, max_age, retire_solved
        self.replay_groups = replay_groups
        self.options = {"correction": correction, "level": is_level, "cap": is_cap, "weight": replay_loss_weight}
        self.advantage_mode, self.running_momentum = advantages, running_momentum
        self.labels = None if labels is None else set(labels)
        self.seed = seed
        self.collect_steps: int | None = None
        self.buffer: list[dict[str, Any]] = []  # {"group": RolloutGroup, "replays": int, "priority": float}
        self.baseline: dict[str, float] = {}
        self.totals = {"admitted": 0, "sampled": 0, "evicted": 0, "retired": 0}
        self._step_log: dict[str, float] = {}

    # ----------------------------------------------------------- decisions
    def admissible(self, group: RolloutGroup) -> bool:
        """Whether a fresh group qualifies for the buffer (threshold, variance, label)."""
        if self.labels is not None and group.label not in self.labels:
            return False
        r = group.rewards.float()
        if self.require_variance and bool((r == r[0]).all()):
            return False
        return float(r.mean()) <= self.reward_threshold

    def priority(self, group: RolloutGroup) -> float:
        """hardness^α with hardness = 1 − mean reward (a tiny floor keeps every stored group drawable)."""
        hardness = max(1.0 - float(group.rewards.float().mean()), 1e-3)
        return hardness ** self.priority_exponent

    def in_collect_phase(self, step: int) -> bool:
        return self.collect_steps is not None and step < self.collect_steps

    # --------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.collect_steps is None:  # a restored state keeps its resolved value
            c = self.collect_steps_arg
            if isinstance(c, float) and c < 1.0:
                if trainer.max_steps is None or trainer.max_steps < 0:
                    raise ValueError(f"collect_steps={c} is a fraction of trainer.max_steps, which is not set")
                c = int(c * trainer.max_steps)
            self.collect_steps = int(c)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        self._step_log = {"replay/phase": 0.0 if self.in_collect_phase(step) else 1.0}
        self._evict_old(step)
        if self.in_collect_phase(step) or not self.buffer:
            self._step_log["replay/sampled"] = 0.0
            return
        chosen = self._sample(step, trainer.world_size, trainer.global_rank)
        batch["replay"] = [self._with_advantages(e["group"]) for e in chosen]
        batch["replay_options"] = dict(self.options)
        ages = [step - e["group"].step for e in chosen]
        self._step_log.update({"replay/sampled": float(len(chosen)),
                               "replay/mean_age": float(sum(ages) / len(ages)) if ages else 0.0})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        groups: list[RolloutGroup] = list((outputs or {}).get("groups") or [])
        groups = _gather_groups(groups, trainer)
        self._update_baseline(groups)
        if self.retire_solved:
            self._retire(groups)
        admitted = 0
        for g in groups:
            if self.in_collect_phase(g.step) and self.admissible(g):
                self.buffer.append({"group": g, "replays": 0, "priority": self.priority(g)})
                admitted += 1
        self.totals["admitted"] += admitted
        self._evict_capacity()
        log = {**self._step_log, "replay/admitted": float(admitted), "replay/buffer_size": float(len(self.buffer)),
               "replay/admitted_total": float(self.totals["admitted"])}
        pl_module.log_dict(log, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------- buffer
    def _sample(self, step: int, world_size: int, rank: int) -> list[dict[str, Any]]:
        n_total = min(len(self.buffer), self.replay_groups * world_size)
        w = torch.tensor([e["priority"] for e in self.buffer], dtype=torch.float64)  # [N]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        # Efraimidis-Spirakis: top-n of u^(1/w) is a weighted draw without replacement.
        u = torch.rand(len(self.buffer), generator=gen, dtype=torch.float64)  # [N]
        keys = torch.log(u) / w.clamp_min(1e-12)  # [N]
        order = torch.argsort(keys, descending=True)[:n_total].tolist()
        chosen = [self.buffer[i] for i in order]
        for e in chosen:  # every rank counts every replay, so the buffers stay identical
            e["replays"] += 1
        self.totals["sampled"] += len(chosen)
        per_rank = math.ceil(n_total / world_size)
        mine = chosen[rank * per_rank:(rank + 1) * per_rank]
        self.buffer = [e for e in self.buffer if e["replays"] < self.max_replays]  # used up after this step
        return mine

    def _with_advantages(self, g: RolloutGroup) -> RolloutGroup:
        if self.advantage_mode == "group":
            adv = g.advantages if g.advantages is not None else torch.zeros_like(g.rewards)
        else:
            adv = g.rewards.float() - self.baseline.get(g.label, float(g.rewards.float().mean()))
        return RolloutGroup(**{**g.to_state(), "advantages": adv.float()})

    def _update_baseline(self, groups: list[RolloutGroup]) -> None:
        m = self.running_momentum
        for g in groups:
            r = float(g.rewards.float().mean())
            old = self.baseline.get(g.label)
            self.baseline[g.label] = r if old is None else m * old + (1 - m) * r

    def _retire(self, groups: list[RolloutGroup]) -> None:
        solved = {g.prompt_id for g in groups if float(g.rewards.float().mean()) > self.reward_threshold}
        before = len(self.buffer)
        self.buffer = [e for e in self.buffer if e["group"].prompt_id not in solved]
        self.totals["retired"] += before - len(self.buffer)

    def _evict_old(self, step: int) -> None:
        if self.max_age is None:
            return
        before = len(self.buffer)
        self.buffer = [e for e in self.buffer if step - e["group"].step <= self.max_age]
        self.totals["evicted"] += before - len(self.buffer)

    def _evict_capacity(self) -> None:
        if len(self.buffer) <= self.capacity:
            return
        order = sorted(range(len(self.buffer)), key=lambda i: (self.buffer[i]["priority"], self.buffer[i]["group"].step,
                                                                -i), reverse=True)
        keep = sorted(order[: self.capacity])
        self.totals["evicted"] += len(self.buffer) - len(keep)
        self.buffer = [self.buffer[i] for i in keep]

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "buffer": [{"group": e["group"].to_state(), "replays": e["replays"], "priority": e["priority"]}
                       for e in self.buffer],
            "baseline": dict(self.baseline), "totals": dict(self.totals), "collect_steps": self.collect_steps,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [{"group": RolloutGroup.from_state(e["group"]), "replays": int(e["replays"]),
                        "priority": float(e["priority"])} for e in state["buffer"]]
        self.baseline = dict(state["baseline"])
        self.totals = dict(state["totals"])
        self.collect_steps = state["collect_steps"]
        self.seed = int(state["seed"])


class RandomReplayCallback(HardCaseReplayCallback):
    """Ablation: admits every fresh group of the collect phase regardless of reward, samples uniformly.

    Same storage, sampling and correction as :class:`HardCaseReplayCallback`; only admission and priority
    differ, so the comparison isolates the value of choosing *hard* groups.
    """

    def admissible(self, group: RolloutGroup) -> bool:
        if self.labels is not None and group.label not in self.labels:
            return False
        r = group.rewards.float()
        return not (self.require_variance and bool((r == r[0]).all()))

    def priority(self, group: RolloutGroup) -> float:
        return 1.0


def _gather_groups(groups: list[RolloutGroup], trainer: L.Trainer) -> list[RolloutGroup]:
    """All ranks' fresh groups, in rank order (identical on every rank); a no-op on one process."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return groups
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, [g.to_state() for g in groups])
    return [RolloutGroup.from_state(s) for part in gathered for s in part]
