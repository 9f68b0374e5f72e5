"""Functional unlearning metrics: pure functions, the twins of the ``Metric`` classes in this package.

Conventions:
    * Per-item functions take and return tensors (``[N]``); aggregates return Python ``float``.
    * Teacher-forced inputs are *mean* negative log-likelihoods over an answer's tokens (``nll_mean``), so
      ``exp(-nll_mean)`` is the length-normalised probability P̃(y|x) of TOFU / open-unlearning.
    * Means over an empty list are ``nan`` (undefined), never an exception.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from rerule_lightning.primitives.answers import RefusalFn, answer_correct, is_refusal
from rerule_lightning.primitives.rouge import rouge_l

#: The nine components of TOFU's model utility (harmonic mean), in open-unlearning's order.
TOFU_MODEL_UTILITY_KEYS: tuple[str, ...] = (
    "retain_probability", "retain_rouge_l_recall", "retain_truth_ratio",
    "real_authors_probability", "real_authors_rouge_l_recall", "real_authors_truth_ratio",
    "world_facts_probability", "world_facts_rouge_l_recall", "world_facts_truth_ratio",
)


def _resolve_refusal_fn(refusal_fn: RefusalFn | None) -> RefusalFn:
    return refusal_fn if refusal_fn is not None else is_refusal


def _check_same_length(a: Sequence, b: Sequence, names: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names} must have the same length, got {len(a)} and {len(b)}")


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if len(values) else math.nan


def _float_tensor(x: Tensor | Sequence[float] | float) -> Tensor:
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.float64)


def _numpy_1d(x: Tensor | Sequence[float], name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


# ----------------------------------------------------------------------------------------------------------
# Generation metrics
# ----------------------------------------------------------------------------------------------------------


def refusal_flags(predictions: Sequence[str], refusal_fn: RefusalFn | None = None) -> list[bool]:
    """Per-item refusal flags (``rerule_lightning.primitives.answers.is_refusal`` unless ``refusal_fn`` is given)."""
    fn = _resolve_refusal_fn(refusal_fn)
    return [bool(fn(p)) for p in predictions]


def refusal_rate(predictions: Sequence[str], refusal_fn: RefusalFn | None = None) -> float:
    """Fraction of ``predictions`` that are refusals (``nan`` for an empty list)."""
    return _mean([float(f) for f in refusal_flags(predictions, refusal_fn)])


def answer_correct_flags(predictions: Sequence[str], values: Sequence[str],
                         refusal_fn: RefusalFn | None = None) -> list[bool]:
    """Per-item :func:`answer_correct`."""
    _check_same_length(predictions, values, "predictions and values")
    fn = _resolve_refusal_fn(refusal_fn)
    return [answer_correct(p, v, fn) for p, v in zip(predictions, values, strict=True)]


def answer_accuracy(predictions: Sequence[str], values: Sequence[str],
                    refusal_fn: RefusalFn | None = None) -> float:
    """Fraction of predictions for which :func:`answer_correct` holds (``nan`` for an empty list)."""
    return _mean([float(f) for f in answer_correct_flags(predictions, values, refusal_fn)])


def rouge_l_recall_scores(predictions: Sequence[str], references: Sequence[str],
                          impl: str = "rouge_score") -> list[float]:
    """Per-item ROUGE-L recall of each prediction against its reference (TOFU / RULE / RWKU convention;
    ``impl`` one of :data:`rerule_lightning.primitives.rouge.ROUGE_IMPLS`)."""
    _check_same_length(predictions, references, "predictions and references")
    return [rouge_l(p, r, impl).recall for p, r in zip(predictions, references, strict=True)]


def rouge_l_f1_scores(predictions: Sequence[str], references: Sequence[str], impl: str = "rouge_score") -> list[float]:
    """Per-item ROUGE-L F1 of each prediction against its reference (MUSE convention; ``impl`` as above)."""
    _check_same_length(predictions, references, "predictions and references")
    return [rouge_l(p, r, impl).fmeasure for p, r in zip(predictions, references, strict=True)]


def verbmem_scores(continuations: Sequence[str], references: Sequence[str]) -> list[float]:
    """MUSE VerbMem: ROUGE-L F1 of each generated continuation against the true continuation."""
    return rouge_l_f1_scores(continuations, references)


def knowmem_scores(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """MUSE KnowMem: ROUGE-L F1 of each generated answer against the reference answer."""
    return rouge_l_f1_scores(answers, references)


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=1)
def _word_tokenizer():  # noqa: ANN202 - nltk has no type hints
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def fluency_tokens(text: str) -> list[str]:
    """Word tokens used by :func:`fluency`.

    RWKU uses ``nltk.word_tokenize`` (Punkt sentence splitting, then NLTK's improved Treebank word
    tokenizer on each sentence). Punkt needs a separately downloaded data package, so we split sentences
    at whitespace that follows ``.``, ``!`` or ``?`` and apply the same ``NLTKWordTokenizer`` to each
    sentence. This equals ``word_tokenize`` except where Punkt would keep an abbreviation ("Dr. Smith")
    inside one sentence.
    """
    tok = _word_tokenizer()
    return [t for sentence in _SENTENCE_BREAK.split(text.strip()) if sentence for t in tok.tokenize(sentence)]


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """RWKU's per-text fluency: weighted n-gram entropy.

    For each ``n`` the n-grams of :func:`fluency_tokens` are counted, their frequencies ``f`` normalised to
    sum to 1, and ``H_n = -Σ f·log2 f`` (``H_n = 0`` when the text has fewer than ``n`` tokens). The result is
    the arithmetic mean of ``weights[i] * H_{ns[i]}``, i.e. ``(2/3·H_2 + 4/3·H_3) / 2`` by default.
    """
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    tokens = fluency_tokens(text)
    weighted = []
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        h = -math.fsum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(w * h)
    return _mean(weighted)


def fluency(texts: Sequence[str]) -> float:
    """RWKU fluency: mean of :func:`ngram_entropy` over ``texts`` (``nan`` for an empty list)."""
    return _mean([ngram_entropy(t) for t in texts])


# ----------------------------------------------------------------------------------------------------------
# Teacher-forced metrics
# ----------------------------------------------------------------------------------------------------------


def answer_probability(nll_mean: Tensor) -> Tensor:
    """Length-normalised answer probability ``exp(-mean NLL)`` per item: ``[N] -> [N]``."""
    return torch.exp(-_float_tensor(nll_mean))  # [N]


def truth_ratio(perturbed_nll_mean: Tensor, paraphrased_nll_mean: Tensor) -> Tensor:
    """TOFU truth ratio per item.

    ``TR = exp(-mean_j nll_pert_j) / exp(-nll_para)``: the geometric mean of the perturbed answers'
    normalised probabilities over the paraphrased answer's, computed in log space as
    ``exp(nll_para - mean_j nll_pert_j)``.

    Args:
        perturbed_nll_mean: Mean NLL of each perturbed answer, ``[N, P]`` (``[N]`` is read as ``P = 1``).
        paraphrased_nll_mean: Mean NLL of the paraphrased answer, ``[N]``.

    Returns:
        Truth ratios, ``[N]``; below 1 means the model prefers the (paraphrased) truth.
    """
    pert = _float_tensor(perturbed_nll_mean)
    pert = pert.unsqueeze(-1) if pert.dim() == 1 else pert  # [N, P]
    para = _float_tensor(paraphrased_nll_mean).reshape(-1)  # [N]
    if pert.dim() != 2 or pert.shape[0] != para.shape[0]:
        raise ValueError(f"expected perturbed [N, P] and paraphrased [N], got {tuple(pert.shape)}, "
                         f"{tuple(para.shape)}")
    return torch.exp(para.to(pert.dtype) - pert.mean(dim=-1))  # [N]


def forget_truth_ratio_agg(tr: Tensor | Sequence[float]) -> float:
    """Forget-split truth-ratio aggregate ``mean(min(TR, 1/TR))`` (1 = true and false equally likely)."""
    t = _float_tensor(tr).reshape(-1)  # [N]
    return float(torch.minimum(t, 1.0 / t).mean()) if t.numel() else math.nan


def retain_truth_ratio_agg(tr: Tensor | Sequence[float]) -> float:
    """Retain / real-author / world-fact truth-ratio aggregate ``mean(max(0, 1 - TR))``."""
    t = _float_tensor(tr).reshape(-1)  # [N]
    return float(torch.clamp(1.0 - t, min=0.0).mean()) if t.numel() else math.nan


def forget_quality(model_tr: Tensor | Sequence[float], retain_tr: Tensor | Sequence[float]) -> float:
    """TOFU forget quality: two-sided ``scipy.stats.ks_2samp`` p-value of the evaluated model's per-item
    forget truth ratios against the retain model's (default ``method="auto"``: exact for small samples).
    """
    from scipy.stats import ks_2samp

    return float(ks_2samp(_numpy_1d(model_tr, "model_tr"), _numpy_1d(retain_tr, "retain_tr")).pvalue)


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean ``n / Σ 1/v``; exactly 0 when any component is 0 (no division by zero).

    Raises:
        ValueError: When ``values`` is empty or contains a negative number.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("harmonic_mean of no values")
    if any(v < 0 for v in vals):
        raise ValueError(f"harmonic_mean needs non-negative values, got {vals}")
    if any(math.isnan(v) for v in vals):
        return math.nan
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / math.fsum(1.0 / v for v in vals)


def model_utility(components: Mapping[str, float]) -> float:
    """Model utility: the harmonic mean of the given components.

    TOFU's model utility has nine components (:data:`TOFU_MODEL_UTILITY_KEYS`): answer probability,
    ROUGE-L recall and the retain truth-ratio aggregate (:func:`retain_truth_ratio_agg`) on each of the
    retain, real-author and world-fact splits, where the real-author and world-fact "probability" is
    normalised over the true and perturbed options (:func:`normalized_option_probability`).
    Our embedded variant passes the same three quantities for whichever of those splits a benchmark has
    (retain and world facts for the embedded setting): any subset of keys is accepted.
    """
    if not components:
        raise ValueError("model_utility needs at least one component")
    return harmonic_mean(components.values())


def normalized_option_probability(true_nll_mean: Tensor, perturbed_nll_mean: Tensor) -> Tensor:
    """Probability of the true answer normalised over the options: ``p_true / (p_true + Σ_j p_pert_j)``.

    Each ``p = exp(-mean NLL)``; computed as a softmax over ``-nll`` for stability.

    Args:
        true_nll_mean: ``[N]``.
        perturbed_nll_mean: ``[N, P]`` (``[N]`` is read as ``P = 1``).

    Returns:
        ``[N]`` values in ``[0, 1]``.
    """
    true = _float_tensor(true_nll_mean).reshape(-1, 1)  # [N, 1]
    pert = _float_tensor(perturbed_nll_mean)
    pert = pert.unsqueeze(-1) if pert.dim() == 1 else pert  # [N, P]
    logits = -torch.cat([true.to(pert.dtype), pert], dim=-1)  # [N, 1 + P]
    return torch.softmax(logits, dim=-1)[:, 0]  # [N]


# ----------------------------------------------------------------------------------------------------------
# Membership inference and extraction
# ----------------------------------------------------------------------------------------------------------


def min_k_percent(token_logprobs: Tensor, mask: Tensor, k: float = 0.4) -> Tensor:
    """Min-K% membership score per item (higher = looks less like a training member).

    Over the ``n`` valid tokens of a row, take the ``m = max(1, floor(n·k))`` lowest token log-probs
    (``int(n * k)`` as open-unlearning computes it) and return the negative of their mean. Rows without
    valid tokens give ``nan``.

    Args:
        token_logprobs: Log-probability of each target token, ``[N, L]``.
        mask: Which tokens count, ``[N, L]`` (bool or 0/1).
        k: Fraction of tokens to keep, in ``(0, 1]``.

    Returns:
        Scores, ``[N]``.
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    lp = _float_tensor(token_logprobs)  # [N, L]
    valid = torch.as_tensor(mask, device=lp.device).bool()  # [N, L]
    if lp.shape != valid.shape or lp.dim() != 2:
        raise ValueError(f"token_logprobs and mask must both be [N, L], got {tuple(lp.shape)}, "
                         f"{tuple(valid.shape)}")
    n = valid.sum(dim=-1)  # [N]
    m = torch.clamp(torch.floor(n.to(torch.float64) * k).long(), min=1)  # [N]
    lowest = torch.sort(lp.masked_fill(~valid, math.inf), dim=-1).values  # [N, L], invalid at the end
    csum = torch.cumsum(lowest, dim=-1)  # [N, L]
    sums = csum.gather(-1, (m - 1).clamp(max=lp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)  # [N]
    scores = -sums / m.to(lp.dtype)  # [N]
    return scores.masked_fill(n == 0, math.nan)  # [N]


def auc_score(member_scores: Tensor | Sequence[float], nonmember_scores: Tensor | Sequence[float]) -> float:
    """ROC AUC for telling non-members (label 1, e.g. holdout) from members (label 0, e.g. forget set).

    ``AUC = P(s_nonmember > s_member) + ½·P(s_nonmember = s_member)``, computed exactly from average ranks
    (Mann–Whitney U). With Min-K% scores (higher = less member-like), AUC near 1 means the members look
    memorised, 0.5 means they are indistinguishable from non-members.
    """
    neg = _numpy_1d(member_scores, "member_scores")
    pos = _numpy_1d(nonmember_scores, "nonmember_scores")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first copy
    ranks = (first_rank + (counts - 1) / 2.0)[inverse.reshape(-1)]  # average rank per element
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def privleak(auc_model: float, auc_retain: float) -> float:
    """MUSE PrivLeak in percent: ``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) × 100``.

    With :func:`auc_score`'s orientation (AUC near 1 = forget set looks memorised), a model that memorised
    the forget set scores about −100, the retain model 0, and over-unlearning gives positive values.

    Raises:
        ValueError: When ``auc_retain`` is 1 (the reference leaks everything; the ratio is undefined).
    """
    if auc_retain == 1.0:
        raise ValueError("privleak is undefined for auc_retain == 1 (division by 1 - auc_retain = 0)")
    return ((1.0 - auc_model) - (1.0 - auc_retain)) / (1.0 - auc_retain) * 100.0


def extraction_strength(pred_ids: Tensor, target_ids: Tensor, mask: Tensor) -> Tensor:
    """Extraction strength per item: ``1 - k/|y|``.

    ``|y|`` is the number of answer tokens (``mask``) and ``k`` the smallest index (counted over answer
    tokens) from which the teacher-forced argmax predictions match the answer to its end; when even the
    last token is wrong, ``k = |y|`` and ES = 0. So ES is the length of the longest correctly predicted
    answer suffix over ``|y|``. Rows without answer tokens give ``nan``.

    Args:
        pred_ids: Argmax prediction for each target position (logits already shifted), ``[N, L]``.
        target_ids: Target token ids, ``[N, L]``.
        mask: Which positions are answer tokens, ``[N, L]``.

    Returns:
        ``[N]`` values in ``[0, 1]``.
    """
    valid = torch.as_tensor(mask, device=target_ids.device).bool()  # [N, L]
    if not (pred_ids.shape == target_ids.shape == valid.shape) or valid.dim() != 2:
        raise ValueError("pred_ids, target_ids and mask must all be [N, L]")
    wrong = (pred_ids != target_ids) & valid  # [N, L]
    wrong_from_here = torch.flip(torch.cumsum(torch.flip(wrong.long(), [-1]), dim=-1), [-1])  # [N, L]
    suffix_len = ((wrong_from_here == 0) & valid).sum(dim=-1)  # [N]
    n = valid.sum(dim=-1)  # [N]
    es = suffix_len.to(torch.float64) / n.to(torch.float64)  # [N]
    return es.masked_fill(n == 0, math.nan)  # [N]


__all__ = [
    "TOFU_MODEL_UTILITY_KEYS", "RefusalFn", "answer_accuracy", "answer_correct", "answer_correct_flags",
    "answer_probability", "auc_score", "extraction_strength", "fluency", "fluency_tokens",
    "forget_quality", "forget_truth_ratio_agg", "harmonic_mean", "knowmem_scores", "min_k_percent",
    "model_utility", "ngram_entropy", "normalized_option_probability", "privleak", "refusal_flags",
    "refusal_rate", "retain_truth_ratio_agg", "rouge_l_f1_scores", "rouge_l_recall_scores", "truth_ratio",
    "verbmem_scores",
]
