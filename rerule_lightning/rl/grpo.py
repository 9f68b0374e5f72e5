"""GRPO's loss as small pure tensor functions (no Lightning, no model): advantages, log-probs, KL, surrogate.

Objective. For B completions of length L (completion mask M), behaviour/old log-probs ``log π_old``,
sequence advantages A and token ratio ρ_t = exp(log π_θ − log π_old), the per-token loss is

    ℓ_t = −min(ρ_t·A, clip(ρ_t, 1−ε_low, 1+ε_high)·A) + β·KL_t,
    KL_t = min(exp(d_t) − d_t − 1, 10),   d_t = clamp(log π_ref − log π_θ, ±20)        (k3, verl's clamps)

with, optionally, the dual clip for A < 0 (the loss is capped at −c·A). The scalar loss aggregates ℓ·M:

* ``grpo``:    mean over sequences of Σ_t ℓM / Σ_t M (length-biased; an all-masked sequence adds 0);
* ``bnpo``:    Σ ℓM / max(Σ M, 1) over the local batch;
* ``dr_grpo``: Σ ℓM / (B × max_completion_length);
* ``dapo``:    Σ ℓM / (active tokens of the whole generation batch across processes / processes).

Advantages are group-relative: A = r − mean_group(r), divided by the group's Bessel-corrected std + eps
(``group``), the whole batch's std + eps (``batch``) or nothing (``none``).

ReRULE's replayed groups were sampled by an older policy, so :func:`off_policy_loss` corrects them with
importance weights ρ = π_θ / π_behaviour: truncated (−sg(min(ρ, c̄))·A·log π_θ), PPO-clipped against the
behaviour policy (with the dual clip), or none (ρ ≡ 1), at token or sequence level. Fresh and replayed
sequences share one normaliser (:func:`aggregate_parts`): each part's per-token loss is multiplied by its
weight and the union of the parts is reduced as if it were one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rerule_lightning.primitives.logprobs import token_logprobs  # noqa: F401  (re-exported; lives with the model primitives)
from rerule_lightning.rl.step_log import kind_signal  # noqa: F401  (re-exported; lives with the step's logging)

ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
OFF_POLICY_CORRECTIONS = ("truncated", "clipped", "none")
OFF_POLICY_LEVELS = ("token", "sequence")


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-4,
                     applicable: Tensor | None = None) -> Tensor:
    """Group-relative advantages.

    Args:
        rewards: ``[N, G]`` rewards, one row per prompt (gathered across processes beforehand).
        scale: ``group`` (divide by each group's std), ``batch`` (by the std of all N·G rewards; still
            centred per group) or ``none`` (centre only). Stds are Bessel-corrected.
        eps: Added to the std before dividing.
        applicable: ``[N, G]`` bool, ``False`` where no reward applies (a reward returned ``None``): those
            entries are left out of every mean and std and get advantage 0. ``None``: all apply.

    Returns:
        ``[N, G]`` advantages in the rewards' (floating) dtype. With G == 1 every advantage is 0; so is that of
        a group with a single applicable reward.

    Raises:
        ValueError: For an unknown ``scale`` or rewards that are not 2-D.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {', '.join(ADVANTAGE_SCALES)}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    r = rewards if rewards.is_floating_point() else rewards.float()  # [N, G]
    if r.size(1) == 1:
        return torch.zeros_like(r)  # [N, 1]: a group of one has no baseline but itself
    if applicable is not None and not bool(applicable.all()):
        return _masked_advantages(r, applicable.to(torch.bool), scale, eps)
    centred = r - r.mean(dim=1, keepdim=True)  # [N, G]
    if scale == "group":
        return centred / (r.std(dim=1, keepdim=True) + eps)  # [N, G]
    if scale == "batch":
        return centred / (r.std() + eps)  # [N, G]
    return centred


def _masked_advantages(r: Tensor, m: Tensor, scale: str, eps: float) -> Tensor:
    """:func:`group_advantages` over the applicable entries ``m`` only (Bessel-corrected, 0 elsewhere)."""
    w = m.to(r.dtype)  # [N, G]
    x = torch.where(m, r, torch.zeros_like(r))  # [N, G]: NaN / garbage outside m never enters a sum
    n = w.sum(1, keepdim=True)  # [N, 1]
    mean = x.sum(1, keepdim=True) / n.clamp(min=1.0)  # [N, 1]
    centred = torch.where(m, x - mean, torch.zeros_like(r))  # [N, G]
    if scale == "group":
        std = ((centred**2).sum(1, keepdim=True) / (n - 1).clamp(min=1.0)).sqrt()  # [N, 1]
        out = centred / (std + eps)  # [N, G]
    elif scale == "batch":
        total = w.sum()
        batch_mean = x.sum() / total.clamp(min=1.0)
        dev = torch.where(m, x - batch_mean, torch.zeros_like(r))  # [N, G]
        out = centred / (((dev**2).sum() / (total - 1).clamp(min=1.0)).sqrt() + eps)  # [N, G]
    else:
        out = centred
    return torch.where(n > 1, out, torch.zeros_like(r))  # [N, G]: one applicable reward has no baseline


def k3_kl(logp: Tensor, ref_logp: Tensor, clamp: float = 20.0, bound: float = 10.0) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref), as verl's ``low_var_kl`` (RULE's released setting).

    min(exp(d) − d − 1, bound) with d = clamp(ref_logp − logp, ±clamp): the log-ratio is clamped first (exp
    stays finite), then the estimate itself (k3 ≥ 0, so only the upper bound binds). Where either clamp binds
    the token gives no KL gradient.

    Args:
        logp: ``[B, L]`` policy log-probs.
        ref_logp: ``[B, L]`` reference log-probs.
        clamp: Bound on |d| (verl: 20).
        bound: Upper bound of the estimate (verl, RULE: 10).

    Returns:
        ``[B, L]`` estimates in [0, bound], 0 where the two agree.
    """
    d = (ref_logp - logp).clamp(-clamp, clamp)  # [B, L]
    return (torch.exp(d) - d - 1.0).clamp(max=bound)  # [B, L]


def _per_sequence(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.dim() == 1:
        if advantages.size(0) != like.size(0):
            raise ValueError(f"advantages {tuple(advantages.shape)} do not match {like.size(0)} sequences")
        return advantages.unsqueeze(-1)  # [B, 1]
    return advantages


def _clip_masks(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """Tokens where the low clip (A < 0, ρ < 1−ε_low) or the high clip (A > 0, ρ > 1+ε_high) binds."""
    low = (ratio < 1.0 - eps_low) & (adv < 0)  # [B, L]
    high = (ratio > 1.0 + eps_high) & (adv > 0)  # [B, L]
    return low, high


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.2, dual_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token, with asymmetric clip range and an optional dual clip.

    ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A). With ``dual_clip = c`` (> 1), for A < 0 the objective is
    also bounded below by c·A, i.e. ℓ = min(ℓ, −c·A): a token whose ratio has grown huge under a negative
    advantage stops contributing an unbounded loss (and gradient), as in the common implementations.

    Args:
        logp: ``[B, L]`` current log-probs (carry the gradient).
        old_logp: ``[B, L]`` log-probs of the sampling policy (treated as constants).
        advantages: ``[B]`` sequence advantages, broadcast over tokens (``[B, L]`` is accepted too).
        eps_low: Lower clip width ε_low.
        eps_high: Upper clip width ε_high.
        dual_clip: Dual-clip constant c > 1, or ``None``.

    Returns:
        ``(loss [B, L], clipped [B, L] bool)``: the unmasked per-token loss, and where the clip binds
        (ρ < 1−ε_low with A < 0, or ρ > 1+ε_high with A > 0; strict inequalities).

    Raises:
        ValueError: If ``dual_clip`` is not > 1.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip}: must be > 1")
    adv = _per_sequence(advantages, logp).to(logp.dtype)  # [B, 1] or [B, L]
    ratio = torch.exp(logp - old_logp.detach())  # [B, L]
    unclipped = ratio * adv  # [B, L]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # [B, L]
    loss = -torch.minimum(unclipped, clipped)  # [B, L]
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * adv)  # [B, L]
        loss = torch.where(adv < 0, capped, loss)  # [B, L]
    low, high = _clip_masks(ratio.detach(), adv, eps_low, eps_high)
    return loss, low | high


def aggregate_loss(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_length: int | None = None,
                   num_active_tokens: float | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar with one of the usual GRPO normalisers (module docstring).

    Args:
        per_token: ``[B, L]`` per-token loss.
        mask: ``[B, L]`` completion mask (bool or 0/1); masked-out values never reach the result.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        max_completion_length: ``dr_grpo``'s constant length (default: L).
        num_active_tokens: ``dapo``'s normaliser: active tokens of the whole generation batch summed across
            processes, divided by the number of processes (default: the local Σ M). Floored at 1.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: For an unknown ``loss_type`` or mismatched shapes.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must be equal [B, L]")
    m = mask.to(per_token.dtype)  # [B, L]
    # where(), not a product: a NaN/inf in a masked-out position must not leak into the sum or gradient.
    masked = torch.where(m > 0, per_token * m, torch.zeros_like(per_token))  # [B, L]
    if loss_type == "grpo":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.mean() if per_seq.numel() else masked.sum()
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = per_token.size(1) if max_completion_length is None else max_completion_length
        return masked.sum() / max(per_token.size(0) * length, 1)
    denom = m.sum().clamp(min=1.0) if num_active_tokens is None else max(float(num_active_tokens), 1.0)
    return masked.sum() / denom


def aggregate_parts(parts: Sequence[tuple[Tensor, Tensor, float]], loss_type: str,
                    max_completion_length: int | None = None, num_active_tokens: float | None = None) -> Tensor:
    """One normaliser over several parts of a step (fresh and replayed sequences), each with a per-token weight.

    The parts' per-token losses are multiplied by their weights, right-padded to one length and stacked, and
    the union is reduced by :func:`aggregate_loss` as one batch: with weights w_i per sequence,
    ``bnpo`` / ``dapo`` give Σ_i w_i Σ_t ℓ_it M_it / N (N = Σ M over the union, or ``num_active_tokens``),
    ``grpo`` gives (1 / n) Σ_i w_i (Σ_t ℓ_it M_it / Σ_t M_it) over the n sequences of the union, ``dr_grpo``
    gives Σ_i w_i Σ_t ℓ_it M_it / (n × max_completion_length). A single part of weight 1 is exactly
    :func:`aggregate_loss`.

    Args:
        parts: ``(per_token [N_k, L_k], mask [N_k, L_k], weight)`` per part.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        max_completion_length: For ``dr_grpo`` (default: the longest part's L).
        num_active_tokens: For ``dapo``: active tokens of the union across processes / processes.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: With no part.
    """
    if not parts:
        raise ValueError("aggregate_parts needs at least one part")
    if len(parts) == 1 and parts[0][2] == 1.0:
        return aggregate_loss(parts[0][0], parts[0][1], loss_type, max_completion_length, num_active_tokens)
    length = max(p.size(1) for p, _, _ in parts)
    dtype = parts[0][0].dtype
    per_token = torch.cat([torch.nn.functional.pad(p * w, (0, length - p.size(1))) for p, _, w in parts])  # [N, L]
    mask = torch.cat([torch.nn.functional.pad(m.to(dtype), (0, length - m.size(1))) for _, m, _ in parts])  # [N, L]
    return aggregate_loss(per_token, mask, loss_type, max_completion_length, num_active_tokens)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)  # [B, L]
    return torch.where(m > 0, x * m, torch.zeros_like(x)).sum() / m.sum().clamp(min=1.0)


def grpo_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    ref_logp: Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
                    dual_clip: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's per-token loss (clipped surrogate + β·k3 KL) before aggregation, with its statistics.

    Args and stats as :func:`grpo_loss`.

    Returns:
        ``(per_token [B, L], stats)``.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, L] shape")
    # Masked-out positions compare logp with itself (ratio 1, KL 0): garbage there (say -1e4 from a padded
    # position) would otherwise overflow exp() and turn the zero gradient into 0 · inf = NaN.
    valid = mask > 0  # [B, L]
    old_logp = torch.where(valid, old_logp, logp.detach())  # [B, L]
    per_token, _ = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high, dual_clip)  # [B, L]
    kl_stat = logp.new_zeros(())
    if ref_logp is not None:
        kl = k3_kl(logp, torch.where(valid, ref_logp, logp).detach())  # [B, L]
        if beta != 0.0:
            per_token = per_token + beta * kl  # [B, L]
        kl_stat = _masked_mean(kl.detach(), mask)
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)  # [B, L]
        low, high = _clip_masks(ratio, _per_sequence(advantages, logp).to(logp.dtype), eps_low, eps_high)
        stats = {
            "kl": kl_stat,
            "clip_ratio/low_mean": _masked_mean(low.to(logp.dtype), mask),
            "clip_ratio/high_mean": _masked_mean(high.to(logp.dtype), mask),
            "clip_ratio/region_mean": _masked_mean((low | high).to(logp.dtype), mask),
        }
    return per_token, stats


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, ref_logp: Tensor | None = None,
              beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
              loss_type: str = "dapo", max_completion_length: int | None = None,
              num_active_tokens: float | None = None,
              extra: Sequence[tuple[Tensor, Tensor, float]] = ()) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss: clipped surrogate + β·k3 KL, aggregated with ``loss_type``.

    Args:
        logp: ``[B, L]`` current log-probs of the completion tokens.
        old_logp: ``[B, L]`` log-probs at sampling time (equal to ``logp.detach()`` when strictly on-policy).
        advantages: ``[B]`` sequence advantages.
        mask: ``[B, L]`` completion mask (prompt and padding positions 0). At masked-out positions
            ``old_logp`` and ``ref_logp`` are replaced by ``logp`` (ratio 1, KL 0), so whatever they hold
            there never reaches the loss, the stats or the gradient.
        ref_logp: ``[B, L]`` reference log-probs, or ``None`` (no KL).
        beta: KL coefficient (the KL is still measured for logging when ``beta`` is 0).
        eps_low: Lower clip width.
        eps_high: Upper clip width.
        dual_clip: Dual-clip constant (> 1) or ``None``.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (see :func:`aggregate_loss`).
        max_completion_length: For ``dr_grpo``.
        num_active_tokens: For ``dapo`` (active tokens of this part and of ``extra``, across processes).
        extra: Further ``(per_token, mask, weight)`` parts (replayed sequences) reduced with the same
            normaliser as these sequences (:func:`aggregate_parts`); empty: :func:`aggregate_loss` alone.

    Returns:
        ``(loss, stats)``; stats are detached scalars over *these* sequences: ``kl`` (masked mean, 0 without a
        reference), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (masked
        fractions of tokens where the low / high / either clip binds).
    """
    per_token, stats = grpo_token_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, beta=beta,
                                       eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)  # [B, L]
    loss = aggregate_parts([(per_token, mask, 1.0), *extra], loss_type, max_completion_length, num_active_tokens)
    return loss, stats


def off_policy_loss(logp: Tensor, behaviour_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    correction: str = "truncated", level: str = "token", cap: float = 2.0, eps_low: float = 0.2,
                    eps_high: float = 0.2, dual_clip: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance-corrected policy-gradient loss per token for replayed (off-policy) groups.

    The importance weight is ρ = π_θ / π_behaviour. At ``token`` level ρ_t = exp(logp_t − behaviour_t). At
    ``sequence`` level every token of a sequence gets exp(masked *mean* of its token log-ratios), the
    geometric mean of its token ratios: the true sequence ratio (a product over up to hundreds of tokens)
    explodes or vanishes, while the geometric mean stays on the token scale, so one cap / clip range fits
    both levels.

    Corrections:
        * ``truncated``: ℓ = −sg(min(ρ, cap))·A·logp (truncated IS; the gradient is −min(ρ, cap)·A·∇logp).
        * ``clipped``: PPO's clipped surrogate against the behaviour policy (:func:`clipped_surrogate`), with
          the dual clip for A < 0 (the loss of a token is at most −c·A however large ρ grows); at sequence
          level the ratio is the geometric-mean sequence ratio, differentiable through every token.
        * ``none``: ρ ≡ 1, ℓ = −A·logp (the naive ablation).

    Args:
        logp: ``[B, L]`` current log-probs (carry the gradient).
        behaviour_logp: ``[B, L]`` log-probs stored when the group was sampled.
        advantages: ``[B]`` sequence advantages.
        mask: ``[B, L]`` completion mask.
        correction: ``truncated``, ``clipped`` or ``none``.
        level: ``token`` or ``sequence``.
        cap: Truncation level c̄ (> 0) for ``truncated``; also the threshold of ``truncated_frac``.
        eps_low: Lower clip width for ``clipped``.
        eps_high: Upper clip width for ``clipped``.
        dual_clip: Dual-clip constant c > 1 for ``clipped`` (``None``: none).

    Returns:
        ``(per_token_loss [B, L], stats)``: aggregate the loss with :func:`aggregate_loss`. Stats are
        detached scalars over valid tokens, from the uncapped ρ: ``is_weight_mean``, ``is_weight_max``,
        ``truncated_frac`` (fraction with ρ > cap) and ``ess`` ((Σρ)² / (n·Σρ²), in (0, 1]); with no valid
        token they take the on-policy values 1, 1, 0, 1.

    Raises:
        ValueError: For an unknown ``correction`` or ``level``, a non-positive ``cap`` or mismatched shapes.
    """
    if correction not in OFF_POLICY_CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; valid: {', '.join(OFF_POLICY_CORRECTIONS)}")
    if level not in OFF_POLICY_LEVELS:
        raise ValueError(f"unknown level {level!r}; valid: {', '.join(OFF_POLICY_LEVELS)}")
    if cap <= 0:
        raise ValueError(f"cap={cap}: must be > 0")
    if logp.shape != behaviour_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, behaviour_logp {tuple(behaviour_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, L] shape")
    valid = mask > 0  # [B, L]
    adv = _per_sequence(advantages, logp).to(logp.dtype)  # [B, 1]
    log_ratio = torch.where(valid, logp - behaviour_logp.detach(), torch.zeros_like(logp))  # [B, L]
    if level == "sequence":
        n_tok = valid.sum(-1, keepdim=True).clamp(min=1).to(logp.dtype)  # [B, 1]
        log_ratio = (log_ratio.sum(-1, keepdim=True) / n_tok).expand_as(logp)  # [B, L]

    if correction == "truncated":
        weight = torch.exp(log_ratio.detach()).clamp(max=cap)  # [B, L]
        loss = -weight * adv * logp  # [B, L]
    elif correction == "clipped":
        loss, _ = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), adv, eps_low, eps_high,
                                    dual_clip)  # [B, L]
    else:
        loss = -adv * logp  # [B, L]

    with torch.no_grad():
        rho = torch.exp(log_ratio)[valid]  # [n]
        n = rho.numel()
        if n == 0:
            one = logp.new_ones(())
            stats = {"is_weight_mean": one, "is_weight_max": one, "truncated_frac": logp.new_zeros(()),
                     "ess": one.clone()}
        else:
            stats = {
                "is_weight_mean": rho.mean(),
                "is_weight_max": rho.max(),
                "truncated_frac": (rho > cap).to(logp.dtype).mean(),
                "ess": rho.sum() ** 2 / (n * (rho**2).sum()).clamp(min=torch.finfo(rho.dtype).tiny),
            }
    return loss, stats


__all__ = ["ADVANTAGE_SCALES", "LOSS_TYPES", "OFF_POLICY_CORRECTIONS", "OFF_POLICY_LEVELS", "aggregate_loss",
           "aggregate_parts", "clipped_surrogate", "group_advantages", "grpo_loss", "grpo_token_loss", "k3_kl",
           "kind_signal", "off_policy_loss", "token_logprobs"]
