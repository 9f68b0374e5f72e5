"""Rollouts: sampling G completions per prompt, and the ``RolloutGroup`` contract with replay callbacks.

Contract between :class:`~rerule_lightning.grpo_module.GRPOUnlearningModule` and replay callbacks:

* ``training_step`` returns ``{"loss": ..., "groups": list[RolloutGroup]}``; ``groups`` are the *fresh*
  groups of this step (one per prompt), on CPU, with the tensors described below. A callback reads them in
  ``on_train_batch_end(trainer, module, outputs, batch, batch_idx)`` as ``outputs["groups"]``.
* A callback may put previously stored groups into the batch in ``on_train_batch_start`` as
  ``batch["replay"] = list[RolloutGroup]``, each with ``advantages`` set by the callback, and the correction
  settings as ``batch["replay_options"] = {"correction", "level", "cap", "weight"}``. The module adds their
  off-policy loss (:meth:`GRPOUnlearningModule.replay_loss`) to the fresh loss and never re-generates them.
* Every tensor of a group is on CPU and the group converts to plain types (:meth:`RolloutGroup.to_state`), so
  a buffer of groups checkpoints with ``torch.save`` and loads with ``weights_only=True``.
"""

from __future__ import annotations

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
            (at the sampling temperature), 0.0 on padding.
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
    behaviour_logprobs: torch.Tensor
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


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 up to and including the first EOS of each row, 0.0 after it.

    Args:
        completion_ids: ``[N, T]`` generated ids (HF pads finished rows with the pad id, which may equal EOS).

    Returns:
        ``[N, T]`` float mask.
    """
    is_eos = completion_ids == eos_id  # [N, T]
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
