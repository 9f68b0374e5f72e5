"""Rollout groups (G completions per prompt, sampled in :mod:`.generation`) and their contract with replay callbacks.

Contract between :class:`~rerule_lightning.modules.grpo.GRPOUnlearningModule` and replay callbacks:

* ``training_step`` returns ``{"loss": ..., "groups": list[RolloutGroup]}``; ``groups`` are the *fresh*
  groups of this step (one per prompt), on CPU, with the tensors described below. A callback reads them in
  ``on_train_batch_end(trainer, module, outputs, batch, batch_idx)`` as ``outputs["groups"]``.
* A callback may put previously stored groups into the batch in ``on_train_batch_start`` as
  ``batch["replay"] = list[RolloutGroup]`` (priority order), each with ``advantages`` set by the callback, and
  the settings as ``batch["replay_options"] = {"spend", "correction", "level", "cap", "weight"}``. With
  ``spend: add`` the module trains on all of them besides the fresh groups; with ``spend: fill`` it uses one
  per fresh group whose rewards are all equal, which it leaves out of the step. Their off-policy loss
  (:meth:`GRPOUnlearningModule.replay_loss`) shares the fresh tokens' normaliser; they are never re-generated.
  ``outputs["replay_used"]`` lists the indices (into ``batch["replay"]``) of the groups the step trained on,
  so a callback counts replays only for those.
* A group's ``step`` is ``trainer.global_step`` when it was sampled; with μ = ``num_iterations`` > 1 that
  counts optimizer steps, and ``step // μ`` is its rollout batch.
* Every tensor of a group is on CPU and the group converts to plain types (:meth:`RolloutGroup.to_state`), so
  a buffer of groups checkpoints with ``torch.save`` and loads with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RolloutGroup:
    """One prompt with its G sampled completions and everything needed to learn from them again.

    Attributes:
        prompt_id: Stable id of the prompt (the dataset row id).
        label: ``forget`` or ``boundary`` (which reward applies).
        kind: Finer label (``forget``, ``boundary_hard``, ``boundary_easy``, ...), for logging.
        prompt_ids: ``[P]`` token ids of the prompt (with BOS, no padding).
        completion_ids: ``[G, T]`` sampled token ids, right-padded with the pad id after EOS.
        completion_mask: ``[G, T]`` 1.0 on sampled tokens (EOS included), 0.0 on padding.
        behaviour_logprobs: ``[G, T]`` log-probs of the sampled tokens under the policy that sampled them
            (at the sampling temperature), 0.0 on padding; ``None`` for a fresh group the step left out
            (``spend: fill``), whose log-probs were never computed (such a group cannot be replayed).
        rewards: ``[G]`` rewards of the completions.
        step: ``trainer.global_step`` at which the group was sampled.
        completions: The G decoded completions (for inspection; not used by the loss).
        advantages: ``[G]`` advantages; set for fresh groups at collection, and for replayed groups by
            the replay callback (stored or recomputed against a running baseline).
        reference_logprobs: ``[G, T]`` log-probs of the sampled tokens under the frozen KL reference (at the
            sampling temperature), 0.0 on padding; ``None`` when the run has no KL term. The reference never
            changes, so a replayed group reuses them instead of another reference pass.
    """

    prompt_id: str
    label: str
    kind: str
    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor | None
    rewards: torch.Tensor
    step: int
    completions: list[str] = field(default_factory=list)
    advantages: torch.Tensor | None = None
    reference_logprobs: torch.Tensor | None = None

    @property
    def num_completions(self) -> int:
        """G."""
        return int(self.completion_ids.size(0))

    def to_state(self) -> dict[str, Any]:
        """Tensors and plain types only, so a checkpoint holding it loads with ``weights_only=True``."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RolloutGroup:
        """Inverse of :meth:`to_state`."""
        return cls(**state)


REPLAY_SPENDING = ("add", "fill")


def replay_slots(rewards: torch.Tensor, n_supplied: int, spend: str = "add", fresh_labels: list[str] | None = None,
                 supplied_labels: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Which supplied replay groups a step trains on, and which fresh groups they replace.

    ``add``: every supplied group, no fresh group replaced. ``fill``: the fresh groups whose G rewards are all
    equal (zero advantage under every scale, hence no policy gradient) are replaced, in batch order, by the
    supplied groups in the order given, until either runs out; with both label lists, a fresh group is replaced
    only by a supplied group of its own label (the batch keeps its forget/boundary mix).

    Args:
        rewards: ``[B, G]`` rewards of this rank's fresh groups.
        n_supplied: Number of groups in ``batch["replay"]`` (priority-ordered by the callback).
        spend: ``add`` or ``fill``.
        fresh_labels: Label of each fresh group (``fill`` with label matching).
        supplied_labels: Label of each supplied group.

    Returns:
        ``(used, left_out)``: indices into the supplied groups, and indices of the fresh groups left out.

    Raises:
        ValueError: For an unknown ``spend``.
    """
    if spend not in REPLAY_SPENDING:
        raise ValueError(f"unknown replay spending {spend!r}; valid: {', '.join(REPLAY_SPENDING)}")
    if spend == "add":
        return list(range(n_supplied)), []
    zero = (rewards.max(1).values == rewards.min(1).values).nonzero().flatten().tolist()  # exact, no std rounding
    if fresh_labels is None or supplied_labels is None:
        n = min(len(zero), n_supplied)
        return list(range(n)), zero[:n]
    used, left_out, taken = [], [], set()
    for f in zero:
        j = next((j for j in range(n_supplied) if j not in taken and supplied_labels[j] == fresh_labels[f]), None)
        if j is not None:
            taken.add(j)
            used.append(j)
            left_out.append(f)
    return used, left_out


def keep_groups(kept: list[int], g: int, prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor,
                mask: torch.Tensor, advantages: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """The rows of the groups ``kept`` (G rows each): prompt ids, ``[K*G, T]`` ids and mask, ``[K*G]`` advantages."""
    rows = [i * g + j for i in kept for j in range(g)]  # K*G
    idx = torch.tensor(rows, dtype=torch.long, device=mask.device)  # [K*G]
    return [prompt_ids[r] for r in rows], completion_ids[idx], mask[idx], advantages[idx]


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """1.0 up to and including the first EOS of each row, 0.0 after it.

    Args:
        completion_ids: ``[N, T]`` generated ids (HF pads finished rows with the pad id, which may equal EOS).
        eos_id: The EOS id, or several stop ids (the first of any ends the row).

    Returns:
        ``[N, T]`` float mask.
    """
    ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, ids)  # [N, T]
    # index of the first EOS (T when none): tokens at positions <= that index are real
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], is_eos.size(1),
                                                                                   dtype=torch.long))  # [N]
    pos = torch.arange(completion_ids.size(1), device=completion_ids.device)  # [T]
    return (pos[None, :] <= first[:, None]).float()  # [N, T]


def pack_sequences(prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-pad prompts to a common length and append completions, trimmed to the longest completion.

    Args:
        prompt_ids: N tensors ``[P_i]``.
        completion_ids: ``[N, T]`` right-padded completions.
        completion_mask: ``[N, T]``.

    Returns:
        ``(input_ids [N, P+T'], attention_mask [N, P+T'], P)`` where ``T'`` is the longest real completion
        and ``P`` the padded prompt length (the completion of row i starts at column ``P``).
    """
    t_real = int(completion_mask.sum(1).max().item()) if completion_mask.numel() else 0
    t_real = max(t_real, 1)
    completion_ids = completion_ids[:, :t_real]  # [N, T']
    completion_mask = completion_mask[:, :t_real]  # [N, T']
    p = max(int(x.numel()) for x in prompt_ids)
    n, dev = len(prompt_ids), completion_ids.device
    ids = torch.full((n, p), pad_id, dtype=torch.long, device=dev)  # [N, P]: built where the ids live
    pmask = torch.zeros((n, p), dtype=torch.long, device=dev)  # [N, P]
    for i, x in enumerate(prompt_ids):
        ids[i, p - x.numel():] = x
        pmask[i, p - x.numel():] = 1
    input_ids = torch.cat([ids, completion_ids], 1)  # [N, P+T']
    attn = torch.cat([pmask, completion_mask.long()], 1)  # [N, P+T']
    return input_ids, attn, p


def pad_stack(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Right-pad ``[N_i, T_i]`` tensors to the longest ``T`` and concatenate them to ``[ΣN_i, T]``."""
    t = max(x.size(1) for x in tensors)
    return torch.cat([torch.nn.functional.pad(x, (0, t - x.size(1)), value=fill) for x in tensors])


def split_groups(columns: dict[str, list[Any]], prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor,
                 mask: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor, texts: list[str], step: int,
                 logp: torch.Tensor | None, ref_logp: torch.Tensor | None = None,
                 kept: list[int] | None = None) -> list[RolloutGroup]:
    """One step's rollouts as B :class:`RolloutGroup` (CPU tensors, trimmed to the longest real completion).

    Args:
        columns: The batch (``id``, ``label``, ``kind`` per prompt).
        prompt_ids: B tensors ``[P_i]``.
        completion_ids: ``[B*G, T]``; ``mask``: ``[B*G, T]``; ``rewards`` / ``advantages``: ``[B, G]``.
        logp: ``[K*G, T']`` behaviour log-probs of the forwarded groups ``kept`` (all B when ``None``).
        ref_logp: ``[K*G, T']`` their reference log-probs, or ``None``.
        kept: Indices of the forwarded groups; the others get ``None`` behaviour / reference log-probs.
    """
    b = len(prompt_ids)
    g = completion_ids.size(0) // max(b, 1)
    kept = list(range(b)) if kept is None else kept
    t = max(int(mask.sum(1).max().item()), 1) if mask.numel() else 1  # = logp.size(1) when every group is kept
    ids = completion_ids[:, :t].detach().cpu()  # [B*G, T]
    msk = mask[:, :t].detach().cpu()  # [B*G, T]
    slot = {i: k for k, i in enumerate(kept)}
    rows = torch.tensor([i * g + j for i in kept for j in range(g)], dtype=torch.long, device=mask.device)  # [K*G]

    def forwarded(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None or not kept:
            return None
        x = torch.nn.functional.pad(x.detach()[:, :t], (0, t - min(x.size(1), t)))  # [K*G, T]
        return (x * mask[rows, :t]).cpu()  # [K*G, T]: masked on the device, one transfer

    lp, ref = forwarded(logp), forwarded(ref_logp)
    part = lambda x, i: None if x is None or i not in slot else x[slot[i] * g:(slot[i] + 1) * g]  # noqa: E731
    return [RolloutGroup(
        prompt_id=columns["id"][i], label=columns["label"][i], kind=columns["kind"][i],
        prompt_ids=prompt_ids[i].detach().cpu(), completion_ids=ids[i * g:(i + 1) * g],
        completion_mask=msk[i * g:(i + 1) * g], behaviour_logprobs=part(lp, i), rewards=rewards[i].detach().cpu(),
        step=step, completions=texts[i * g:(i + 1) * g], advantages=advantages[i].detach().cpu(),
        reference_logprobs=part(ref, i),
    ) for i in range(b)]


def stack_groups(groups: list[RolloutGroup], pad_id: int, device: torch.device | str) -> dict[str, Any]:
    """Stored groups as one padded batch on ``device`` (what replaying them needs besides the model).

    Returns:
        ``prompt_ids`` (R·G tensors ``[P]``, one transfer per group), ``completion_ids`` / ``completion_mask`` /
        ``behaviour_logprobs`` ``[R*G, T]``, ``advantages`` ``[R*G]`` and ``ref_logprobs`` ``[R*G, T]`` (the
        stored reference log-probs; ``None`` unless every group has them).
    """
    prompts = [grp.prompt_ids.to(device) for grp in groups]
    cat = lambda name, fill: pad_stack([getattr(grp, name) for grp in groups], fill).to(device)  # noqa: E731
    return {
        "prompt_ids": [x for x, grp in zip(prompts, groups) for _ in range(grp.num_completions)],
        "completion_ids": cat("completion_ids", float(pad_id)).long(),  # [R*G, T]
        "completion_mask": cat("completion_mask", 0.0),  # [R*G, T]
        "behaviour_logprobs": cat("behaviour_logprobs", 0.0),  # [R*G, T]
        "advantages": torch.cat([grp.advantages for grp in groups]).to(device).float(),  # [R*G]
        "ref_logprobs": cat("reference_logprobs", 0.0) if all(grp.reference_logprobs is not None
                                                             for grp in groups) else None,  # [R*G, T]
    }
