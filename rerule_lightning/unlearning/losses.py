"""Losses of the established unlearning baselines, as pure functions of logits, labels and activations.

Notation (REFERENCE "Baseline losses"): for an answer y to a prompt x, the sequence log-likelihood is
ℓ_θ(y|x) = Σ_t log π_θ(y_t | x, y_<t) over the answer tokens; |y| is the number of answer tokens; σ is the
logistic sigmoid; "ref" is the model before unlearning (frozen). Every loss here is *minimised*.

Labels follow :mod:`rerule_lightning.primitives.prompting`: ``[B, L]`` token ids with prompt and padding positions set to
``IGNORE_INDEX``; the logit at position t predicts the label at t + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rerule_lightning.primitives.prompting import IGNORE_INDEX


def answer_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the answer tokens.

    Args:
        logits: ``[B, L, V]`` logits for every position.
        labels: ``[B, L]`` token ids, ``IGNORE_INDEX`` on prompt and padding positions.

    Returns:
        ``(logp [B, L-1], mask [B, L-1])``: log π(label_{t+1} | ...) and 1.0 where the label is an answer token.
    """
    shift_labels = labels[:, 1:]  # [B, L-1]
    mask = (shift_labels != IGNORE_INDEX).float()  # [B, L-1]
    safe = shift_labels.clamp(min=0)  # [B, L-1]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    return logp * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ(y|x) and |y| of each sequence.

    Args:
        logits: ``[B, L, V]`` logits.
        labels: ``[B, L]`` labels (``IGNORE_INDEX`` outside the answer).

    Returns:
        ``(logp [B], lengths [B])``: the summed answer log-likelihood and the number of answer tokens.
    """
    logp, mask = answer_token_logprobs(logits, labels)  # [B, L-1] x2
    return logp.sum(-1), mask.sum(-1)  # [B], [B]


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over every answer token of the batch (the SFT loss; GDR's retain term).

    Args:
        logits: ``[B, L, V]`` logits.
        labels: ``[B, L]`` labels (``IGNORE_INDEX`` outside the answer).
    """
    logp, mask = answer_token_logprobs(logits, labels)  # [B, L-1] x2
    return -logp.sum() / mask.sum().clamp(min=1.0)


def ga_loss(forget_nll: torch.Tensor) -> torch.Tensor:
    """Gradient ascent (GA): maximise the NLL of the forget answers, i.e. minimise −NLL_forget.

    Args:
        forget_nll: Mean token NLL of the forget answers (:func:`masked_nll`).
    """
    return -forget_nll


def graddiff_loss(forget_nll: torch.Tensor, retain_nll: torch.Tensor, gamma: float = 1.0,
                  alpha: float = 1.0) -> torch.Tensor:
    """GradDiff: γ·(−NLL_forget) + α·NLL_retain (gradient ascent on forget, descent on retain).

    Args:
        forget_nll: Mean token NLL of the forget answers.
        retain_nll: Mean token NLL of the retain answers.
        gamma: Weight γ of the forget (ascent) term.
        alpha: Weight α of the retain (descent) term.
    """
    return gamma * ga_loss(forget_nll) + alpha * retain_nll


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al., 2024) on forget answers.

    L = (2/β)·mean_i log(1 + (π_θ(y_i|x_i)/π_ref(y_i|x_i))^β) = −(2/β)·mean_i log σ(−β·(ℓ_θ − ℓ_ref)).
    Its gradient is 2·σ(β·(ℓ_θ − ℓ_ref))·∇ℓ_θ, which tends to ∇ mean_i ℓ_θ(y_i|x_i) (gradient ascent on the
    summed sequence NLL) as β → 0.

    Args:
        logp: ``[B]`` ℓ_θ(y|x) of the forget answers under the trained model.
        ref_logp: ``[B]`` ℓ_ref(y|x) under the model before unlearning (no gradient needed).
        beta: Inverse temperature β (> 0; 0.1 is typical).
    """
    if beta <= 0:
        raise ValueError(f"npo_loss: beta={beta}: must be > 0")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp.detach())).mean()


def simnpo_loss(logp: torch.Tensor, lengths: torch.Tensor, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al., 2024): NPO without a reference, with a length-normalised reward and a margin.

    L = −(2/β)·mean_i log σ(−(β/|y_i|)·ℓ_θ(y_i|x_i) − γ).

    Args:
        logp: ``[B]`` ℓ_θ(y|x) of the forget answers.
        lengths: ``[B]`` |y|, answer tokens per sequence (≥ 1).
        beta: Inverse temperature β (> 0).
        gamma: Reward margin γ (0 in the SimNPO paper's TOFU setting).
    """
    if beta <= 0:
        raise ValueError(f"simnpo_loss: beta={beta}: must be > 0")
    return -(2.0 / beta) * F.logsigmoid(-(beta / lengths.clamp(min=1.0)) * logp - gamma).mean()


def dpo_loss(logp_chosen: torch.Tensor, ref_chosen: torch.Tensor, logp_rejected: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Direct preference optimisation (Rafailov et al., 2023).

    L = −mean_i log σ(β·((ℓ_θ(y_w) − ℓ_ref(y_w)) − (ℓ_θ(y_l) − ℓ_ref(y_l)))).

    Args:
        logp_chosen: ``[B]`` ℓ_θ of the preferred answers y_w.
        ref_chosen: ``[B]`` ℓ_ref of the preferred answers.
        logp_rejected: ``[B]`` ℓ_θ of the rejected answers y_l.
        ref_rejected: ``[B]`` ℓ_ref of the rejected answers.
        beta: Inverse temperature β (> 0).
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta={beta}: must be > 0")
    margin = (logp_chosen - ref_chosen.detach()) - (logp_rejected - ref_rejected.detach())  # [B]
    return -F.logsigmoid(beta * margin).mean()


def idk_dpo_loss(logp_idk: torch.Tensor, ref_idk: torch.Tensor, logp_answer: torch.Tensor,
                 ref_answer: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """IdkDPO: :func:`dpo_loss` with an "I don't know"-style refusal preferred over the original forget answer,
    the reference being the model before unlearning, scaled by 2/β as open-unlearning's DPO trainer scales it
    (the same factor as :func:`npo_loss`, which IdkDPO reduces to without a preferred answer):

    L = −(2/β)·mean_i log σ(β·((ℓ_θ(y_w) − ℓ_ref(y_w)) − (ℓ_θ(y_l) − ℓ_ref(y_l)))).

    At π_θ = π_ref it is (2/β)·log 2 (20·log 2 ≈ 13.9 at β = 0.1), and its gradient is 2/β times DPO's: with a
    retain term of weight α (GDR), the forget term weighs 2/β = 20 times more than plain DPO's would.

    Args:
        logp_idk: ``[B]`` ℓ_θ of the refusal answers (y_w).
        ref_idk: ``[B]`` ℓ_ref of the refusal answers.
        logp_answer: ``[B]`` ℓ_θ of the original forget answers (y_l).
        ref_answer: ``[B]`` ℓ_ref of the original forget answers.
        beta: Inverse temperature β (> 0).
    """
    if beta <= 0:
        raise ValueError(f"idk_dpo_loss: beta={beta}: must be > 0")
    return (2.0 / beta) * dpo_loss(logp_idk, ref_idk, logp_answer, ref_answer, beta)


def rmu_control_vector(hidden_size: int, seed: int, coeff: float) -> torch.Tensor:
    """c·u with u a unit vector drawn uniformly from [0, 1)^D and normalised (as in the WMDP paper), fixed by
    ``seed``.

    Args:
        hidden_size: D, width of the residual stream.
        seed: Seed of u.
        coeff: Steering coefficient c.

    Returns:
        ``[D]`` float32 tensor on the CPU.
    """
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(hidden_size, generator=g)  # [D]
    return coeff * u / u.norm()


def rmu_activation_mse(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sequence's mean over its counted positions of (1/D)·‖diff‖².

    Each sequence weighs the same whatever its number of counted tokens (open-unlearning's RMU reduction); a
    sequence with no counted position contributes 0.

    Args:
        diff: ``[B, L, D]`` activation differences.
        mask: ``[B, L]`` 1 on positions that count.
    """
    per_pos = diff.float().pow(2).mean(-1)  # [B, L]
    m = mask.float()  # [B, L]
    per_seq = (per_pos * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]
    return per_seq.mean()


def rmu_forget_loss(hidden: torch.Tensor, mask: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """RMU's forget term: :func:`rmu_activation_mse` of h_θ(x_f) − c·u, i.e. (1/D)·‖h_θ(x_f) − c·u‖² averaged
    over each sequence's counted positions, then over the batch.

    Args:
        hidden: ``[B, L, D]`` activations of the trained model at the chosen layer on forget text.
        mask: ``[B, L]`` 1 on positions that count (the module passes the answer tokens, as open-unlearning).
        control: ``[D]`` the fixed control vector c·u (:func:`rmu_control_vector`).
    """
    return rmu_activation_mse(hidden - control.to(hidden), mask)


def rmu_retain_loss(hidden: torch.Tensor, frozen_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's retain term: :func:`rmu_activation_mse` of h_θ(x_r) − h_frozen(x_r) (0 when the model equals the
    frozen one); the module weighs it by α.

    Args:
        hidden: ``[B, L, D]`` activations of the trained model at the chosen layer on retain text.
        frozen_hidden: ``[B, L, D]`` the frozen model's activations there.
        mask: ``[B, L]`` 1 on positions that count (the module passes the answer tokens).
    """
    return rmu_activation_mse(hidden - frozen_hidden.detach(), mask)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` 1.0 at the positions of answer tokens (labels ≠ ``IGNORE_INDEX``, unshifted): the positions
    whose activations RMU's terms count, as open-unlearning's RMU (``labels != -100``).

    Args:
        labels: ``[B, L]`` labels (``IGNORE_INDEX`` on prompt and padding positions).
    """
    return (labels != IGNORE_INDEX).float()


def kl_retain_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KLR: mean over retain answer tokens of KL(π_frozen ‖ π_θ) = Σ_v p_ref(v)·(log p_ref(v) − log p_θ(v)).

    Args:
        logits: ``[B, L, V]`` logits of the trained model on retain sequences.
        ref_logits: ``[B, L, V]`` logits of the frozen model on the same sequences.
        labels: ``[B, L]`` labels (``IGNORE_INDEX`` outside the answer): which positions count.
    """
    mask = (labels[:, 1:] != IGNORE_INDEX).float()  # [B, L-1]
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, L-1, V]
    logp_ref = torch.log_softmax(ref_logits[:, :-1].detach().float(), dim=-1)  # [B, L-1, V]
    kl = (logp_ref.exp() * (logp_ref - logq)).sum(-1)  # [B, L-1]
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)
