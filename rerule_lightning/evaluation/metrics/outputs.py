"""How a model forgets: each generated answer classified as exactly one of four kinds.

The classes, decided in this order (the first that applies):

1. ``refusal``: :func:`rerule_lightning.primitives.answers.is_refusal` (the refusal rate's detector);
2. ``correct``: :func:`rerule_lightning.primitives.answers.answer_correct` (the answer accuracy's matcher: the fact
   value occurs in a non-refusal);
3. ``degenerate``: :func:`degenerate_reason` finds a reason (below);
4. ``wrong``: everything else, a fluent answer that does not state the fact.

So ``refusal_rate + answer_accuracy + wrong_answer_rate + degenerate_rate = 1`` on every split, exactly in counts
(refusal and accuracy are already exclusive: a refusal is never correct), and the refusal and accuracy
metrics keep their meaning. A correct answer is never called degenerate ("Lisbon Lisbon Lisbon" states the fact).

**Degenerate** (:func:`degenerate_reason`), the first rule that applies:

* ``empty``: no letter or digit at all (an empty string, punctuation only);
* ``control``: a control, format, private-use, surrogate or unassigned character (Unicode categories
  ``Cc``, ``Cf``, ``Co``, ``Cs``, ``Cn``; newline and tab excepted) or the replacement character U+FFFD, the
  marks of byte-level BPE decoding token soup;
* ``repetition``: one word n-gram (n = 1 … 4) repeated at least three times in a row ("the the the",
  "of the of the of the");
* with a vocabulary (the embedded world: every word of its questions, answers, perturbed answers and refusal
  templates, i.e. every word its models were trained on): ``vocabulary``, fewer than half of the answer's words
  are in it ("ryzibar." has none);
* without one (real benchmarks): ``symbols``, fewer than half of the non-space characters are letters or digits.

Words are maximal runs of letters / digits (with an inner apostrophe), lower-cased (:func:`words`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from rerule_lightning.evaluation.metrics.base import MeanOfItems
from rerule_lightning.primitives.answers import RefusalFn, answer_correct, is_refusal

#: The four output classes, in decision order.
OUTPUT_CLASSES: tuple[str, ...] = ("refusal", "correct", "degenerate", "wrong")
#: The metric key of each class (``<split>/<key>``); refusal and correct are the existing metrics.
CLASS_METRICS: dict[str, str] = {"refusal": "refusal_rate", "correct": "answer_accuracy",
                                 "degenerate": "degenerate_rate", "wrong": "wrong_answer_rate"}
#: Consecutive repeats of one word n-gram that make a text degenerate, and the longest n-gram checked.
MIN_REPEATS, MAX_NGRAM = 3, 4
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_BAD_CATEGORIES = {"Cc", "Cf", "Co", "Cs", "Cn"}


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``: maximal runs of letters / digits, an inner apostrophe kept ("author's")."""
    return _WORD.findall(text.lower())


def vocabulary_of(texts: Iterable[str]) -> frozenset[str]:
    """Every word (:func:`words`) of ``texts``: the vocabulary of :func:`degenerate_reason`."""
    return frozenset(w for t in texts for w in words(t))


def _has_bad_character(text: str) -> bool:
    return any(ch == "\ufffd" or (ch not in "\n\t" and unicodedata.category(ch) in _BAD_CATEGORIES) for ch in text)


def _repeats(tokens: Sequence[str]) -> bool:
    for n in range(1, MAX_NGRAM + 1):
        for start in range(len(tokens) - n * MIN_REPEATS + 1):
            gram = tokens[start:start + n]
            if all(tokens[start + k * n:start + (k + 1) * n] == gram for k in range(1, MIN_REPEATS)):
                return True
    return False


def degenerate_reason(text: str, vocabulary: Collection[str] | None = None) -> str | None:
    """Why ``text`` is degenerate (``empty``, ``control``, ``repetition``, ``vocabulary`` or ``symbols``; see the
    module docstring), or ``None`` when it is not."""
    tokens = words(text)
    if not tokens:
        return "empty"
    if _has_bad_character(text):
        return "control"
    if _repeats(tokens):
        return "repetition"
    if vocabulary is not None:
        known = sum(w in vocabulary for w in tokens)
        return "vocabulary" if 2 * known < len(tokens) else None
    visible = [ch for ch in text if not ch.isspace()]
    alnum = sum(ch.isalnum() for ch in visible)
    return "symbols" if 2 * alnum < len(visible) else None


def output_class(prediction: str, value: str, vocabulary: Collection[str] | None = None,
                 refusal_fn: RefusalFn | None = None) -> str:
    """The class of one generated answer: one of :data:`OUTPUT_CLASSES` (decided in that order)."""
    fn = refusal_fn if refusal_fn is not None else is_refusal
    if fn(prediction):
        return "refusal"
    if answer_correct(prediction, value, fn):
        return "correct"
    return "degenerate" if degenerate_reason(prediction, vocabulary) is not None else "wrong"


def output_classes(predictions: Sequence[str], values: Sequence[str], vocabulary: Collection[str] | None = None,
                   refusal_fn: RefusalFn | None = None) -> list[str]:
    """Per-item :func:`output_class`."""
    if len(predictions) != len(values):
        raise ValueError(f"predictions and values must have the same length, got {len(predictions)} and {len(values)}")
    return [output_class(p, v, vocabulary, refusal_fn) for p, v in zip(predictions, values, strict=True)]


def output_class_rates(predictions: Sequence[str], values: Sequence[str], vocabulary: Collection[str] | None = None,
                       refusal_fn: RefusalFn | None = None) -> dict[str, float]:
    """Share of each class, keyed by :data:`CLASS_METRICS` names (they sum to 1; ``nan`` for an empty list)."""
    classes = output_classes(predictions, values, vocabulary, refusal_fn)
    n = len(classes)
    return {CLASS_METRICS[c]: (classes.count(c) / n if n else float("nan")) for c in OUTPUT_CLASSES}


class OutputClassRate(MeanOfItems):
    """Fraction of completions of one output class (twin of :func:`output_class_rates`); with
    ``category="degenerate"`` it is ``<split>/degenerate_rate``, with ``"wrong"`` ``<split>/wrong_answer_rate``.

    Args:
        category: One of :data:`OUTPUT_CLASSES`.
        vocabulary: Known words (the embedded world's); ``None`` uses the vocabulary-free rule.
        refusal_fn: Refusal detector; defaults to ``rerule_lightning.primitives.answers.is_refusal``.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, category: str, vocabulary: Collection[str] | None = None,
                 refusal_fn: RefusalFn | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if category not in OUTPUT_CLASSES:
            raise ValueError(f"category={category!r}: choose one of {OUTPUT_CLASSES}")
        self.category, self.vocabulary, self.refusal_fn = category, vocabulary, refusal_fn

    def update(self, predictions: Sequence[str], values: Sequence[str]) -> None:
        """Add completions and their reference fact strings (same length)."""
        classes = output_classes(predictions, values, self.vocabulary, self.refusal_fn)
        self._add([float(c == self.category) for c in classes])


__all__ = ["CLASS_METRICS", "MAX_NGRAM", "MIN_REPEATS", "OUTPUT_CLASSES", "OutputClassRate", "degenerate_reason",
           "output_class", "output_class_rates", "output_classes", "vocabulary_of", "words"]
