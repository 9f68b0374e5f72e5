"""ROUGE-L as each benchmark scores it, without the reference implementations' per-call overhead.

Three implementations (``ROUGE_IMPLS``), chosen per benchmark (``SplitSpec.rouge`` for metrics, ``rouge`` of the
RULE reward):

* ``rouge_score`` (TOFU, the embedded world): Google's ``rouge_score``, stemmer on (below);
* ``rouge_score_nostem`` (MUSE): the same without stemming (MUSE's ``use_stemmer=False``);
* ``rwku`` (RWKU, and RULE's reward on RWKU): the ``rouge`` package's summary-level ROUGE-L
  (:func:`rwku_rouge_l`), case- and punctuation-sensitive, with an empty prediction scored as ``"NOANSWER"``.

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
_TOKENIZER_NOSTEM = DefaultTokenizer(use_stemmer=False)
ROUGE_IMPLS = ("rouge_score", "rouge_score_nostem", "rwku")


class RougeL(NamedTuple):
    """ROUGE-L scores of one prediction against one reference."""

    precision: float
    recall: float
    fmeasure: float


@lru_cache(maxsize=65536)
def rouge_tokens(text: str) -> tuple[str, ...]:
    """Tokens exactly as ``rouge_score``'s default tokenizer (stemmer on) produces them."""
    return tuple(_TOKENIZER.tokenize(text))


@lru_cache(maxsize=65536)
def rouge_tokens_nostem(text: str) -> tuple[str, ...]:
    """Tokens as ``rouge_score``'s default tokenizer produces them with the stemmer off (MUSE)."""
    return tuple(_TOKENIZER_NOSTEM.tokenize(text))


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


def rouge_l(prediction: str, reference: str, impl: str = "rouge_score") -> RougeL:
    """ROUGE-L of ``prediction`` against ``reference`` (argument order as in our metrics, not rouge_score's).

    Args:
        prediction: The generated text.
        reference: The reference text.
        impl: One of :data:`ROUGE_IMPLS` (see the module docstring).

    Returns zeros when either side has no tokens, as ``rouge_score`` does.
    """
    if impl == "rwku":
        return rwku_rouge_l(prediction, reference)
    if impl not in ROUGE_IMPLS:
        raise ValueError(f"rouge={impl!r}: choose one of {ROUGE_IMPLS}")
    tokens = rouge_tokens if impl == "rouge_score" else rouge_tokens_nostem
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return RougeL(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, pred)
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return RougeL(precision, recall, f)


def rouge_l_recall(prediction: str, reference: str, impl: str = "rouge_score") -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (TOFU / RULE / RWKU convention)."""
    return rouge_l(prediction, reference, impl).recall


def rouge_l_f1(prediction: str, reference: str, impl: str = "rouge_score") -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (MUSE convention)."""
    return rouge_l(prediction, reference, impl).fmeasure


# ------------------------------------------------------------------ the ``rouge`` package's ROUGE-L (RWKU)
def rwku_sentences(text: str) -> list[list[str]]:
    """The ``rouge`` package's preprocessing: split at every ``.``, drop empty pieces, squeeze whitespace, then
    split each sentence at single spaces (a whitespace-only piece becomes one empty word, as there)."""
    return [" ".join(s.split()).split(" ") for s in text.split(".") if len(s) > 0]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The words of the LCS of ``x`` and ``y`` that the ``rouge`` package reconstructs (its tie-break: step
    back in ``x`` only when that keeps a strictly longer LCS, else in ``y``)."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else (prev[j] if prev[j] > row[j - 1] else row[j - 1])
    out, i, j = [], n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rwku_rouge_l(prediction: str, reference: str) -> RougeL:
    """ROUGE-L as RWKU and RULE compute it: ``Rouge().get_scores(prediction, reference, avg=True)["rouge-l"]``.

    Summary level over ``.``-separated sentences, with the package's default ``exclusive=True``: the LCS of each
    reference sentence with each prediction sentence contributes its *distinct* words to one union set, and
    recall / precision divide that set's size by the number of distinct reference / prediction words. Case,
    punctuation other than ``.`` and tokenisation at single spaces are kept. An empty prediction is scored
    as ``"NOANSWER"`` (RWKU's convention); a side with no sentence left (e.g. ``"..."``), where the package
    raises, scores zeros. F1 carries the package's ``1e-8`` in the denominator.
    """
    hyp = rwku_sentences(prediction if prediction != "" else "NOANSWER")
    ref = rwku_sentences(reference)
    if not hyp or not ref:
        return RougeL(0.0, 0.0, 0.0)
    m = len({w for s in ref for w in s})
    n = len({w for s in hyp for w in s})
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union.update(_lcs_words(r, h))
    recall, precision = len(union) / m, len(union) / n
    return RougeL(precision, recall, 2.0 * (precision * recall / (precision + recall + 1e-8)))


__all__ = ["ROUGE_IMPLS", "RougeL", "lcs_length", "rouge_l", "rouge_l_f1", "rouge_l_recall", "rouge_tokens",
           "rouge_tokens_nostem", "rwku_rouge_l", "rwku_sentences"]
