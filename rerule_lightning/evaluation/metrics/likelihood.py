"""Teacher-forced metrics: answer probability, truth ratio, forget quality, Min-K% / membership AUC,
privleak and extraction strength.

Simple means use ``"sum"`` states; metrics that need every item at once (KS test, AUC, truth-ratio
per-item reports) keep ``"cat"`` states, gathered from all ranks before ``compute``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from rerule_lightning.evaluation.metrics import functional as F
from rerule_lightning.evaluation.metrics.base import Float64Metric, MeanOfItems


class AnswerProbability(MeanOfItems):
    """Mean length-normalised answer probability ``exp(-mean NLL)`` (twin of
    :func:`functional.answer_probability`). Passing ``perturbed_nll_mean`` to ``update`` gives the
    option-normalised probability of TOFU's real-author / world-fact splits instead
    (:func:`functional.normalized_option_probability`)."""

    is_differentiable = False
    higher_is_better = None

    def update(self, nll_mean: Tensor, perturbed_nll_mean: Tensor | None = None) -> None:
        """Add items: ``nll_mean`` ``[N]`` and optionally ``perturbed_nll_mean`` ``[N, P]``."""
        if perturbed_nll_mean is None:
            self._add(F.answer_probability(nll_mean.detach()))  # [N]
        else:
            self._add(F.normalized_option_probability(nll_mean.detach(), perturbed_nll_mean.detach()))  # [N]


class TruthRatio(Float64Metric):
    """TOFU truth ratio, aggregated for the forget split (``mean(min(TR, 1/TR))``) or for the retain,
    real-author and world-fact splits (``mean(max(0, 1 - TR))``). Per-item values are kept (``"cat"``
    state) for eval reports and :class:`ForgetQuality`; see :meth:`per_item`.

    Args:
        aggregator: ``"forget"`` or ``"retain"``.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True  # forget: 1 = truth indistinguishable; retain: 1 = truth strongly preferred

    def __init__(self, aggregator: Literal["forget", "retain"] = "forget", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if aggregator not in ("forget", "retain"):
            raise ValueError(f"aggregator must be 'forget' or 'retain', got {aggregator!r}")
        self.aggregator = aggregator
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, perturbed_nll_mean: Tensor, paraphrased_nll_mean: Tensor) -> None:
        """Add items: perturbed answers' mean NLL ``[N, P]`` and the paraphrased answer's ``[N]``."""
        self.values.append(self._values(F.truth_ratio(perturbed_nll_mean.detach(),
                                                      paraphrased_nll_mean.detach())))  # [N]

    def compute(self) -> Tensor:
        """The split's aggregate over all items (all ranks)."""
        tr = self._cat(self.values)  # [N]
        agg = F.forget_truth_ratio_agg(tr) if self.aggregator == "forget" else F.retain_truth_ratio_agg(tr)
        return torch.tensor(agg, dtype=torch.float64, device=self.device)

    def per_item(self) -> Tensor:
        """Per-item truth ratios from all ranks, ``[N]`` (rank-major order under DDP)."""
        return self._synced_cat("values")


class ForgetQuality(Float64Metric):
    """TOFU forget quality: KS-test p-value of the model's per-item forget truth ratios against the retain
    model's (twin of :func:`functional.forget_quality`).

    Args:
        retain_truth_ratios: The retain model's per-item forget truth ratios, ``[M]``.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True

    def __init__(self, retain_truth_ratios: Tensor | Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        ref = torch.as_tensor(retain_truth_ratios, dtype=torch.float64).detach().cpu().reshape(-1)  # [M]
        if ref.numel() == 0:
            raise ValueError("retain_truth_ratios is empty")
        self.retain_truth_ratios = ref  # a constant reference, not a state: reset() keeps it
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, truth_ratios: Tensor) -> None:
        """Add the evaluated model's per-item forget truth ratios, ``[N]``."""
        self.values.append(self._values(truth_ratios))  # [N]

    def compute(self) -> Tensor:
        """The p-value over all items (all ranks); ``nan`` before any item was added."""
        tr = self._cat(self.values)  # [N]
        if tr.numel() == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.device)
        return torch.tensor(F.forget_quality(tr, self.retain_truth_ratios), dtype=torch.float64,
                            device=self.device)

    def per_item(self) -> Tensor:
        """The evaluated model's per-item truth ratios from all ranks, ``[N]``."""
        return self._synced_cat("values")


class MinKPercent(Float64Metric):
    """Min-K% membership scores (twin of :func:`functional.min_k_percent`); ``compute`` gives their mean
    and :meth:`per_item` the scores themselves (higher = looks less like a training member).

    Args:
        k: Fraction of lowest-probability tokens averaged.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, k: float = 0.4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {k}")
        self.k = k
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, token_logprobs: Tensor, mask: Tensor) -> None:
        """Add items: token log-probs ``[N, L]`` and the mask of tokens that count ``[N, L]``."""
        self.scores.append(self._values(F.min_k_percent(token_logprobs.detach(), mask, self.k)))  # [N]

    def compute(self) -> Tensor:
        """Mean score over items with at least one valid token."""
        s = self._cat(self.scores)  # [N]
        s = s[~torch.isnan(s)]  # [N']
        return s.mean() if s.numel() else torch.tensor(math.nan, dtype=torch.float64, device=self.device)

    def per_item(self) -> Tensor:
        """Per-item scores from all ranks, ``[N]``."""
        return self._synced_cat("scores")


class MembershipAUC(Float64Metric):
    """ROC AUC of membership scores, members (forget set) labelled 0 and non-members (holdout) 1
    (twin of :func:`functional.auc_score`): with Min-K% scores, near 1 = the forget set looks memorised."""

    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_member", default=[], dist_reduce_fx="cat")  # 1.0 / 0.0 (floats gather safely)

    def update(self, scores: Tensor, is_member: Tensor) -> None:
        """Add items: membership scores ``[N]`` and whether each item is a member (forget set) ``[N]``."""
        s = self._values(scores.detach())  # [N]
        m = self._values(torch.as_tensor(is_member).bool())  # [N]
        if s.shape != m.shape:
            raise ValueError(f"scores and is_member must have the same shape, got {s.shape}, {m.shape}")
        self.scores.append(s)
        self.is_member.append(m)

    def _auc(self) -> float:
        s, m = self._cat(self.scores), self._cat(self.is_member).bool()  # [N], [N]
        if m.all() or not m.any():  # also when empty: AUC needs both members and non-members
            return math.nan
        return F.auc_score(s[m], s[~m])

    def compute(self) -> Tensor:
        """The AUC over all items (all ranks); ``nan`` unless both members and non-members were seen."""
        return torch.tensor(self._auc(), dtype=torch.float64, device=self.device)


class PrivLeak(MembershipAUC):
    """MUSE PrivLeak (percent) of the model's membership AUC relative to the retain model's
    (twin of :func:`functional.privleak`): about −100 for a model that memorised the forget set, 0 for
    the retain model.

    Args:
        auc_retain: The retain model's AUC (same scores and splits); must not be 1.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    def __init__(self, auc_retain: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= auc_retain < 1.0:
            raise ValueError(f"auc_retain must be in [0, 1) (privleak divides by 1 - auc_retain), "
                             f"got {auc_retain}")
        self.auc_retain = float(auc_retain)

    def compute(self) -> Tensor:
        """PrivLeak over all items (all ranks); ``nan`` unless both members and non-members were seen."""
        return torch.tensor(F.privleak(self._auc(), self.auc_retain), dtype=torch.float64, device=self.device)


class ExtractionStrength(MeanOfItems):
    """Mean extraction strength (twin of :func:`functional.extraction_strength`); items without answer
    tokens are skipped."""

    is_differentiable = False
    higher_is_better = None

    def update(self, pred_ids: Tensor, target_ids: Tensor, mask: Tensor) -> None:
        """Add items: argmax predictions, targets and answer mask, each ``[N, L]``."""
        self._add(F.extraction_strength(pred_ids.detach(), target_ids, mask))  # [N]


__all__ = ["AnswerProbability", "ExtractionStrength", "ForgetQuality", "MembershipAUC", "MinKPercent",
           "PrivLeak", "TruthRatio"]
