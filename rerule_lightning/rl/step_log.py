"""What one GRPO step logs, as pure functions of its tensors: the reward matrix of a step's rollouts, the mean
reward and zero-variance share per prompt kind, and the ``train/*`` / ``replay/*`` dictionary the module logs.

Split from :class:`~rerule_lightning.modules.grpo.GRPOUnlearningModule` so that the module is only glue, and so
that every logged number can be checked on hand-made tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch


def reward_matrix(raw: Sequence[float | None], b: int, g: int,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[B, G]`` rewards of a step and which of them apply (a reward function's ``None`` = not applicable).

    Args:
        raw: ``B*G`` rewards, group-major (the G completions of prompt 0 first); ``None`` where a reward does not
            apply (counted as 0 in the matrix, ``False`` in the mask).
        b: Prompts in the step.
        g: Completions per prompt.
        device: Where the tensors live.

    Returns:
        ``(rewards [B, G] float32, applicable [B, G] bool)``.
    """
    rewards = torch.tensor([0.0 if r is None else float(r) for r in raw], device=device).view(b, g)  # [B, G]
    applicable = torch.tensor([r is not None for r in raw], device=device).view(b, g)  # [B, G]
    return rewards, applicable


def kind_signal(rewards: torch.Tensor, kinds: list[str]) -> dict[str, torch.Tensor]:
    """Per prompt kind (e.g. ``forget``, ``boundary_hard``, ``boundary_easy``): mean reward, fraction of groups
    whose G rewards are all equal (no group-normalised gradient) and number of groups in the step.

    Args:
        rewards: ``[B, G]`` rewards of this step's fresh groups.
        kinds: The kind of each of the B prompts (names reduced to ``[a-z0-9_]`` for the metric keys).

    Returns:
        ``train/reward_mean_<kind>``, ``train/zero_std_frac_<kind>`` and ``train/groups_<kind>`` per kind present.
    """
    zero = (rewards.max(1).values == rewards.min(1).values).float()  # [B]: exact, no std rounding
    out: dict[str, torch.Tensor] = {}
    for kind in dict.fromkeys(kinds):
        sel = torch.tensor([k == kind for k in kinds], device=rewards.device)  # [B]
        key = re.sub(r"[^a-z0-9_]", "_", str(kind).lower())
        out[f"train/reward_mean_{key}"] = rewards[sel].mean()
        out[f"train/zero_std_frac_{key}"] = zero[sel].mean()
        out[f"train/groups_{key}"] = sel.sum().float()
    return out


def step_metrics(loss: torch.Tensor, stats: Mapping[str, torch.Tensor | float], rewards: torch.Tensor,
                 completion_mask: torch.Tensor, labels: Sequence[str], kinds: Sequence[str] | None = None,
                 applicable: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The metrics of one step under their logged names (TRL's where they exist: reward, reward_std,
    frac_reward_zero_std, completion length).

    Args:
        loss: The step's loss (detached here).
        stats: The loss's statistics (:func:`rerule_lightning.rl.grpo.grpo_loss`); ``replay/*`` keys keep their
            scope, every other key is logged as ``train/<key>``.
        rewards: ``[B, G]`` rewards of the fresh groups.
        completion_mask: ``[B*G, T]`` mask of the sampled completions.
        labels: The label (``forget`` / ``boundary``) of each of the B prompts.
        kinds: A finer kind per prompt for :func:`kind_signal` (the embedded world's); defaults to ``labels``.
        applicable: ``[B, G]`` which rewards apply; when some do not, ``train/reward_applicable_frac`` and
            ``train/reward_applicable_mean`` (the mean over the rewards that apply) are added.

    Returns:
        Metric name -> scalar tensor.
    """
    b = rewards.size(0)
    std = rewards.std(1) if rewards.size(1) > 1 else torch.zeros(b, device=rewards.device)  # [B]
    log = {"train/loss": loss.detach(), "train/reward": rewards.mean(), "train/reward_std": std.mean(),
           "train/frac_reward_zero_std": (std == 0).float().mean(),
           "train/completion_length": completion_mask.sum(1).float().mean()}
    for label in ("forget", "boundary"):
        sel = torch.tensor([lab == label for lab in labels], device=rewards.device)  # [B]
        if sel.any():
            log[f"train/reward_{label}"] = rewards[sel].mean()
    log.update(kind_signal(rewards, list(kinds or labels)))
    if applicable is not None and not bool(applicable.all()):
        log["train/reward_applicable_frac"] = applicable.float().mean()
        log["train/reward_applicable_mean"] = rewards[applicable].mean() if applicable.any() else rewards.new_zeros(())
    for k, v in stats.items():
        key = k if k.startswith("replay/") else f"train/{k}"
        log[key] = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
    return log
