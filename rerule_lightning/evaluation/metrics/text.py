"""Metrics on generated text (greedy completions): refusal rate, answer accuracy, ROUGE-L, fluency.

Each ``update`` scores its strings on the local rank and adds the per-item floats to ``"sum"`` states, so
the metrics reduce correctly under DDP. Whether higher is better depends on the split (forget: lower
ROUGE / accuracy is better; retain: higher), so ``higher_is_better`` is ``None`` except for fluency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rerule_lightning.evaluation.metrics import functional as F
from rerule_lightning.evaluation.metrics.base import MeanOfItems


class RefusalRate(MeanOfItems):
    """Fraction of completions that are refusals (twin of :func:`functional.refusal_rate`).

    Args:
        refusal_fn: Refusal detector; defaults to ``rerule_lightning.primitives.answers.is_refusal``.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, refusal_fn: F.RefusalFn | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refusal_fn = refusal_fn

    def update(self, predictions: Sequence[str]) -> None:
        """Add completions."""
        self._add([float(f) for f in F.refusal_flags(predictions, self.refusal_fn)])


class AnswerAccuracy(MeanOfItems):
    """Fraction of completions that state the reference fact and do not refuse
    (twin of :func:`functional.answer_accuracy`).

    Args:
        refusal_fn: Refusal detector; defaults to ``rerule_lightning.primitives.answers.is_refusal``.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, refusal_fn: F.RefusalFn | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refusal_fn = refusal_fn

    def update(self, predictions: Sequence[str], values: Sequence[str]) -> None:
        """Add completions and their reference fact strings (same length)."""
        self._add([float(f) for f in F.answer_correct_flags(predictions, values, self.refusal_fn)])


class RougeLRecall(MeanOfItems):
    """Mean ROUGE-L recall against references (TOFU / RULE / RWKU; twin of
    :func:`functional.rouge_l_recall_scores`).

    Args:
        impl: ROUGE implementation, one of :data:`rerule_lightning.primitives.rouge.ROUGE_IMPLS`.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, impl: str = "rouge_score", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.impl = impl

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Add completions and their references (same length)."""
        self._add(F.rouge_l_recall_scores(predictions, references, self.impl))


class RougeLF1(MeanOfItems):
    """Mean ROUGE-L F1 against references (MUSE VerbMem / KnowMem; twin of
    :func:`functional.rouge_l_f1_scores`).

    Args:
        impl: ROUGE implementation, one of :data:`rerule_lightning.primitives.rouge.ROUGE_IMPLS`.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, impl: str = "rouge_score", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.impl = impl

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Add completions and their references (same length)."""
        self._add(F.rouge_l_f1_scores(predictions, references, self.impl))


class Fluency(MeanOfItems):
    """RWKU fluency: mean weighted 2/3-gram entropy of completions (twin of :func:`functional.fluency`)."""

    is_differentiable = False
    higher_is_better = True

    def update(self, texts: Sequence[str]) -> None:
        """Add completions."""
        self._add([F.ngram_entropy(t) for t in texts])


__all__ = ["AnswerAccuracy", "Fluency", "RefusalRate", "RougeLF1", "RougeLRecall"]
