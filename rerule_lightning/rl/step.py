"""The per-token losses of one GRPO iteration and its micro-batched forward / backward (no Lightning, no model).

:class:`~rerule_lightning.modules.grpo.GRPOUnlearningModule` passes its own policy pass (``forward``) and
``manual_backward`` (``backward``); everything else is here, on tensors:

* :func:`replay_token_loss`: ℓ^off + β·KL3 per token of replayed rows against their stored behaviour (and
  reference) log-probs (:func:`rerule_lightning.rl.grpo.off_policy_loss`, :func:`rerule_lightning.rl.grpo.k3_kl`);
* :func:`micro_batched_iteration`: fresh and replayed parts forwarded and back-propagated in micro-batches
  (:func:`rerule_lightning.rl.micro_batch.accumulate`) under the whole batch's normaliser, with the single pass's
  statistics recomputed without gradient on the whole batch's detached log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rerule_lightning.rl.grpo import grpo_token_loss, k3_kl, off_policy_loss
from rerule_lightning.rl.micro_batch import LogprobFn, LossPart, accumulate


@dataclass(frozen=True)
class ClipSettings:
    """The module's loss constants: KL coefficient, clip range, dual clip."""

    beta: float
    eps_low: float
    eps_high: float
    dual_clip: float | None


def replay_token_loss(logp: Tensor, mask: Tensor, inputs: dict[str, Any], rows: slice, opts: dict[str, Any],
                      clip: ClipSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token off-policy loss (+ β·KL3) of the replayed rows ``rows``.

    Args:
        logp: ``[n, T']`` policy log-probs of those rows (carry the gradient).
        mask: ``[n, T']`` their completion mask.
        inputs: The stacked replayed groups (``behaviour_logprobs``, ``advantages``, ``ref_logprobs`` or ``None``).
        rows: Which rows of ``inputs`` ``logp`` belongs to.
        opts: ``correction`` (truncated / clipped / none), ``level`` (token / sequence), ``cap`` (c̄).
        clip: The module's β, ε and dual clip (``clipped`` uses ε and the dual clip).

    Returns:
        ``(per_token [n, T'], stats)``, stats prefixed ``replay/`` (IS weight mean / max, truncated fraction, ESS, KL).
    """
    beh = inputs["behaviour_logprobs"][rows, : logp.size(1)]  # [n, T']
    per_tok, stats = off_policy_loss(logp, beh, inputs["advantages"][rows], mask,
                                     correction=opts.get("correction", "truncated"), level=opts.get("level", "token"),
                                     cap=opts.get("cap", 2.0), eps_low=clip.eps_low, eps_high=clip.eps_high,
                                     dual_clip=clip.dual_clip)
    if inputs["ref_logprobs"] is not None:
        ref = inputs["ref_logprobs"][rows, : logp.size(1)]  # [n, T']
        kl = k3_kl(logp, torch.where(mask > 0, ref, logp).detach())  # [n, T']
        per_tok = per_tok + clip.beta * kl  # [n, T']
        with torch.no_grad():
            stats["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1.0)
    return per_tok, {f"replay/{k}": v for k, v in stats.items()}


def micro_batched_iteration(fresh: tuple[list[Tensor], Tensor, Tensor, Tensor], old_logp: Tensor | None,
                            ref_logp: Tensor | None, replayed: dict[str, Any] | None, opts: dict[str, Any],
                            clip: ClipSettings, forward: LogprobFn, backward: Callable[[Tensor], None],
                            loss_type: str, micro_batch_size: int, max_completion_length: int,
                            num_active_tokens: float) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """One iteration (of the μ) of a step, forwarded and back-propagated in micro-batches.

    Args:
        fresh: ``(prompt_ids, completion_ids [K*G, T], mask [K*G, T], advantages [K*G])`` of the forwarded fresh
            rows (no rows: every fresh group was replaced).
        old_logp: ``[K*G, T']`` π_old, or ``None`` in the first iteration (the first pass then is π_old).
        ref_logp: ``[K*G, T']`` reference log-probs, or ``None``.
        replayed: The stacked replayed groups, or ``None``.
        opts: ``batch["replay_options"]`` (``weight`` and the correction).
        clip: The module's β, ε and dual clip.
        forward: Policy log-probs of some rows.
        backward: Back-propagates one micro-batch's loss.
        loss_type: The normaliser.
        micro_batch_size: Rows per forward / backward.
        max_completion_length: ``dr_grpo``'s length.
        num_active_tokens: ``dapo``'s normaliser.

    Returns:
        ``(loss, stats, old_logp [K*G, T'])``: the loss and stats of the single pass.
    """
    f_pids, f_ids, f_mask, f_adv = fresh
    kw = dict(beta=clip.beta, eps_low=clip.eps_low, eps_high=clip.eps_high, dual_clip=clip.dual_clip)

    def fresh_loss(logp: Tensor, m: Tensor, rows: slice) -> Tensor:
        t = logp.size(1)
        old = logp.detach() if old_logp is None else old_logp[rows, :t]  # [n, t]: the step's first pass = π_old
        ref = None if ref_logp is None else ref_logp[rows, :t]
        return grpo_token_loss(logp, old, f_adv[rows], m, ref_logp=ref, **kw)[0]  # [n, t]

    parts = [LossPart(f_pids, f_ids, f_mask, fresh_loss)] if f_pids else []
    if replayed is not None:
        parts.append(LossPart(replayed["prompt_ids"], replayed["completion_ids"], replayed["completion_mask"],
                              lambda lp, m, rows: replay_token_loss(lp, m, replayed, rows, opts, clip)[0],
                              float(opts.get("weight", 1.0))))
    loss, logps = accumulate(parts, forward, backward, loss_type, micro_batch_size, max_completion_length,
                             num_active_tokens)
    with torch.no_grad():
        if f_pids:
            logp, m = logps[0], f_mask[:, : logps[0].size(1)]  # [K*G, T']
            old_logp = logp if old_logp is None else old_logp
        else:
            logp = m = old_logp = f_mask.new_zeros(0, 1)  # [0, 1]
        _, stats = grpo_token_loss(logp, old_logp, f_adv, m, ref_logp=ref_logp, **kw)
        if replayed is not None:
            r_mask = replayed["completion_mask"][:, : logps[-1].size(1)]
            stats.update(replay_token_loss(logps[-1], r_mask, replayed, slice(None), opts, clip)[1])
    return loss, stats, old_logp


__all__ = ["ClipSettings", "micro_batched_iteration", "replay_token_loss"]
