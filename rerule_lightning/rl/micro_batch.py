"""Micro-batched gradient accumulation for one GRPO optimizer step (pure PyTorch: no Lightning, no model).

A step trains on S sequences (fresh and replayed parts, each part with a per-token weight w). The whole-batch
loss of :func:`rerule_lightning.rl.grpo.aggregate_parts` is a sum over rows divided by a constant of the whole
batch, so it splits into micro-batches exactly: each micro-batch k contributes

    L_k = w Σ_{i∈k} c_i / D,   c_i = Σ_t ℓ_it M_it / max(Σ_t M_it, 1)  (grpo)   or   Σ_t ℓ_it M_it  (others),

with D computed once from the whole step (:func:`normaliser`):

    grpo: |S|;   bnpo: max(Σ_S M, 1);   dapo: max(num_active_tokens, 1) (else as bnpo);
    dr_grpo: max(|S| · max_completion_length, 1).

Σ_k L_k equals the single-pass loss, so back-propagating each L_k in turn accumulates the single-pass gradient
(up to float rounding of the different summation order). Only one micro-batch's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rerule_lightning.rl.grpo import LOSS_TYPES

#: ``(prompt_ids, completion_ids [n, T], completion_mask [n, T]) -> (logp [n, T'], mask [n, T'])``.
LogprobFn = Callable[[list[Tensor], Tensor, Tensor], tuple[Tensor, Tensor]]


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row slices of at most ``size`` rows covering ``range(n)`` in order (one slice when ``size`` is ``None``)."""
    if n <= 0:
        return []
    step = n if size is None else max(int(size), 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def normaliser(loss_type: str, num_sequences: int, num_tokens: float, max_completion_length: int,
               num_active_tokens: float | None = None) -> float:
    """The whole-step denominator D of ``loss_type`` (module docstring).

    Args:
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        num_sequences: Rows of the whole step, every part (|S|).
        num_tokens: Σ M over the whole step (local).
        max_completion_length: ``dr_grpo``'s constant length.
        num_active_tokens: ``dapo``'s global token count / processes (``None``: ``num_tokens``).

    Returns:
        D > 0.

    Raises:
        ValueError: For an unknown ``loss_type``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if loss_type == "grpo":
        return float(max(num_sequences, 1))
    if loss_type == "dr_grpo":
        return float(max(num_sequences * max_completion_length, 1))
    if loss_type == "dapo" and num_active_tokens is not None:
        return max(float(num_active_tokens), 1.0)
    return max(float(num_tokens), 1.0)


def partial_loss(per_token: Tensor, mask: Tensor, weight: float, loss_type: str, denominator: float) -> Tensor:
    """One micro-batch's share w Σ_i c_i / D of the whole-step loss (module docstring).

    Args:
        per_token: ``[n, L]`` per-token loss of the micro-batch's rows.
        mask: ``[n, L]`` their completion mask; masked-out values never reach the result.
        weight: The part's per-token weight (1 fresh, ``replay_loss_weight`` replayed).
        loss_type: ``grpo`` (per-sequence means) or any other (token sums).
        denominator: :func:`normaliser` of the whole step.

    Returns:
        A scalar tensor.
    """
    m = mask.to(per_token.dtype)  # [n, L]
    masked = torch.where(m > 0, per_token * weight * m, torch.zeros_like(per_token))  # [n, L]
    if loss_type == "grpo":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / denominator
    return masked.sum() / denominator


@dataclass
class LossPart:
    """One kind of sequence in the step (the fresh ones, or the replayed ones).

    Attributes:
        prompt_ids: N tensors ``[P_i]``.
        completion_ids: ``[N, T]`` completions.
        completion_mask: ``[N, T]``.
        token_loss: ``(logp [n, T'], mask [n, T'], rows) -> per-token loss [n, T']`` for the rows ``rows``.
        weight: Per-token weight of the part.
    """

    prompt_ids: list[Tensor]
    completion_ids: Tensor
    completion_mask: Tensor
    token_loss: Callable[[Tensor, Tensor, slice], Tensor]
    weight: float = 1.0

    @property
    def num_rows(self) -> int:
        return int(self.completion_ids.size(0))


def chunked_logprobs(forward: LogprobFn, prompt_ids: list[Tensor], completion_ids: Tensor, completion_mask: Tensor,
                     size: int | None) -> tuple[Tensor, Tensor]:
    """``forward`` over micro-batches of ``size`` rows, right-padded (0.0) to the whole batch's trimmed width.

    Returns:
        ``(logp [N, T'], mask [N, T'])`` with T' the longest real completion of the N rows, as one pass gives.
    """
    n = completion_ids.size(0)
    if size is None or n <= size:
        return forward(prompt_ids, completion_ids, completion_mask)
    t = max(int(completion_mask.sum(1).max().item()), 1) if completion_mask.numel() else 1
    outs = []
    for sl in micro_batches(n, size):
        logp, _ = forward(prompt_ids[sl], completion_ids[sl], completion_mask[sl])  # [n, t_k]
        outs.append(torch.nn.functional.pad(logp, (0, t - logp.size(1))))  # [n, T']
    return torch.cat(outs), completion_mask[:, :t]  # [N, T'], [N, T']


def accumulate(parts: Sequence[LossPart], forward: LogprobFn, backward: Callable[[Tensor], None], loss_type: str,
               micro_batch_size: int | None, max_completion_length: int,
               num_active_tokens: float | None = None) -> tuple[Tensor, list[Tensor]]:
    """Forward and back-propagate every part in micro-batches of at most ``micro_batch_size`` rows.

    Args:
        parts: The step's parts (rows of a micro-batch never mix parts).
        forward: Policy log-probs of some rows (carrying the gradient).
        backward: Back-propagates one micro-batch's loss (``LightningModule.manual_backward``).
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        micro_batch_size: Rows per forward / backward (``None``: one per part).
        max_completion_length: ``dr_grpo``'s constant length.
        num_active_tokens: ``dapo``'s normaliser (across processes).

    Returns:
        ``(loss, logps)``: the detached whole-step loss (Σ of the micro-batch losses) and, per part, the detached
        policy log-probs ``[N, T']`` (padded with 0.0 to the part's longest real completion).
    """
    n = sum(p.num_rows for p in parts)
    tokens = float(sum(float(p.completion_mask.sum()) for p in parts))
    denom = normaliser(loss_type, n, tokens, max_completion_length, num_active_tokens)
    total: Tensor | None = None
    logps: list[Tensor] = []
    for part in parts:
        width = max(int(part.completion_mask.sum(1).max().item()), 1) if part.completion_mask.numel() else 1
        chunks = []
        for sl in micro_batches(part.num_rows, micro_batch_size):
            logp, m = forward(part.prompt_ids[sl], part.completion_ids[sl], part.completion_mask[sl])  # [n, t_k]
            loss = partial_loss(part.token_loss(logp, m, sl), m, part.weight, loss_type, denom)
            backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
            chunks.append(torch.nn.functional.pad(logp.detach(), (0, width - logp.size(1))))  # [n, T']
        logps.append(torch.cat(chunks) if chunks else part.completion_mask.new_zeros(0, 1))
    if total is None:
        raise ValueError("accumulate needs at least one row")
    return total, logps


__all__ = ["LogprobFn", "LossPart", "accumulate", "chunked_logprobs", "micro_batches", "normaliser", "partial_loss"]
