"""ROUGE-L exactly as Google's ``rouge_score`` computes it, without its per-call overhead.

``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)``
tokenises both strings (lower-case, non-alphanumerics to spaces, Porter stemming of tokens longer than
three characters), takes the longest common subsequence (LCS) of the two token lists, and reports
precision = LCS / |prediction|, recall = LCS / |reference| and their harmonic mean. We reuse its
tokenizer (so tokenisation can never drift) and memoise stemming, which dominates its run time.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from rouge_score.tokenizers import DefaultTokenizer

_TOKENIZER = DefaultTokenizer(use_stemmer=True)


class RougeL(NamedTuple):
    """ROUGE-L scores of one prediction against one reference."""

    precision: float
    recall: float
    fmeasure: float


@lru_cache(maxsize=65536)
def rouge_tokens(text: str) -> tuple[str, ...]:
    """Tokens exactly as ``rouge_score``'s default tokenizer (stemmer on) produces them."""
    return tuple(_TOKENIZER.tokenize(text))


def lcs_length(a: tuple[str, ...] | list[str], b: tuple[str, ...] | list[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(|a|·|b|) time, O(|b|) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else (prev[j] if prev[j] > cur[j - 1] else cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> RougeL:
    """ROUGE-L of ``prediction`` against ``reference`` (argument order as in our metrics, not rouge_score's).

    Returns zeros when either side has no tokens, as ``rouge_score`` does.
    """
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return RougeL(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, pred)
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return RougeL(precision, recall, f)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (TOFU / RULE / RWKU convention)."""
    return rouge_l(prediction, reference).recall


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (MUSE convention)."""
    return rouge_l(prediction, reference).fmeasure


__all__ = ["RougeL", "lcs_length", "rouge_l", "rouge_l_f1", "rouge_l_recall", "rouge_tokens"]
