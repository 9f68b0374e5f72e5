"""What a benchmark evaluates: one :class:`SplitSpec` per split and the cross-split metrics (:class:`EvalSuite`).

A datamodule exposes its suite as ``datamodule.eval_suite``; :class:`rerule_lightning.evaluation.evaluator.UnlearningEvaluator`
builds exactly the metrics a spec enables and names them ``<split>/<metric>``. Cross-split keys:

* ``<forget_quality_split>/forget_quality``: KS-test p-value of that split's truth ratios against the retain
  model's (TOFU's forget quality);
* ``<member>/mia_auc`` and ``<member>/privleak``: Min-K% membership AUC of ``mia = (member, non_member)``
  and privleak relative to the retain model's AUC;
* ``utility/model_utility``: harmonic mean of probability, ROUGE-L recall and truth ratio of every utility split;
* ``<suite.name>/<standard name>`` for every ``headline`` entry (an alias of the metric key it names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rerule_lightning.primitives.rouge import ROUGE_IMPLS

#: Metrics of a split, by the SplitSpec flag that enables them.
GENERATION_METRICS = ("refusal_rate", "answer_accuracy", "wrong_answer_rate", "degenerate_rate", "rouge_l_recall",
                      "rouge_l_f1", "fluency")
TEACHER_FORCED_METRICS = ("probability", "extraction_strength", "min_k")
CROSS_SPLIT_METRICS = ("forget_quality", "mia_auc", "privleak", "model_utility")


@dataclass
class SplitSpec:
    """The metrics of one evaluation split.

    Attributes:
        name: Split name (the eval dataloader's split and the metric key's scope).
        generate: Greedy generation -> refusal_rate, answer_accuracy, wrong_answer_rate, degenerate_rate
            (:mod:`rerule_lightning.evaluation.metrics.outputs`: the four sum to 1), rouge_l_recall, rouge_l_f1, fluency.
        max_new_tokens: Greedy tokens for this split; ``None`` uses the module's ``eval_max_new_tokens``.
        stop: Generations are cut at the first occurrence of any of these strings (MUSE KnowMem).
        teacher_forced: Teacher-forced answer pass -> probability, extraction_strength, min_k.
        truth_ratio: Paraphrased + perturbed answer passes -> truth_ratio (items without them give nan).
        option_probability: Probability normalised over the true and the perturbed options (TOFU's real
            authors and world facts) instead of exp(-mean NLL).
        rouge: ROUGE implementation of the split's ROUGE-L metrics (``rerule_lightning.primitives.rouge.ROUGE_IMPLS``):
            ``rouge_score`` (TOFU), ``rouge_score_nostem`` (MUSE), ``rwku`` (the ``rouge`` package, RWKU).
        reference_max_tokens: ROUGE references cut to their first this-many tokens of the policy's tokenizer
            (MUSE VerbMem: 128); ``None`` keeps them whole.
    """

    name: str
    generate: bool = True
    max_new_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    teacher_forced: bool = True
    truth_ratio: bool = False
    option_probability: bool = False
    rouge: str = "rouge_score"
    reference_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.rouge not in ROUGE_IMPLS:
            raise ValueError(f"SplitSpec {self.name!r}: rouge={self.rouge!r}: choose one of {ROUGE_IMPLS}")
        if self.reference_max_tokens is not None and self.reference_max_tokens < 1:
            raise ValueError(f"SplitSpec {self.name!r}: reference_max_tokens={self.reference_max_tokens} must be >= 1")
        if not self.name or "/" in self.name:
            raise ValueError(f"SplitSpec.name={self.name!r}: must be non-empty without '/'")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"SplitSpec {self.name!r}: max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.option_probability and not self.teacher_forced:
            raise ValueError(f"SplitSpec {self.name!r}: option_probability needs teacher_forced")
        self.stop = list(self.stop)

    def metric_names(self) -> list[str]:
        """The per-split metrics this spec enables, in report order."""
        names = list(GENERATION_METRICS) if self.generate else []
        if self.teacher_forced:
            names.append("probability")
        if self.truth_ratio:
            names.append("truth_ratio")
        if self.teacher_forced:
            names += ["extraction_strength", "min_k"]
        return names


@dataclass
class EvalSuite:
    """A benchmark's evaluation: its splits and cross-split metrics.

    Attributes:
        name: Suite name (``embedded``, ``tofu``, ``muse_books``, ``muse_news``, ``rwku``); headline scope.
        splits: One spec per split, in dataloader order.
        forget_quality_split: Split whose truth ratios are KS-tested against the retain model's.
        mia: ``(member, non_member)`` splits of the Min-K% membership AUC and privleak.
        utility_splits: Splits whose probability, ROUGE-L recall and truth ratio enter model utility.
        headline: Standard metric name -> metric key; each is also logged as ``<name>/<standard name>``.
    """

    name: str
    splits: list[SplitSpec]
    forget_quality_split: str | None = None
    mia: tuple[str, str] | None = None
    utility_splits: list[str] = field(default_factory=list)
    headline: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.splits]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"EvalSuite {self.name!r}: splits must be non-empty and distinct, got {names}")
        if self.mia is not None:
            self.mia = (str(self.mia[0]), str(self.mia[1]))
        spec = {s.name: s for s in self.splits}
        refs = ([self.forget_quality_split] if self.forget_quality_split else []) + list(self.mia or ()) \
            + list(self.utility_splits)
        unknown = [r for r in refs if r not in spec]
        if unknown:
            raise ValueError(f"EvalSuite {self.name!r}: unknown split(s) {unknown}; splits are {names}")
        if self.forget_quality_split and not spec[self.forget_quality_split].truth_ratio:
            raise ValueError(f"EvalSuite {self.name!r}: forget_quality_split {self.forget_quality_split!r} "
                             "needs truth_ratio=True")
        for s in self.mia or ():
            if not spec[s].teacher_forced:
                raise ValueError(f"EvalSuite {self.name!r}: MIA split {s!r} needs teacher_forced=True")

    @property
    def split_names(self) -> list[str]:
        return [s.name for s in self.splits]

    def spec(self, name: str) -> SplitSpec:
        """The spec of split ``name`` (``KeyError`` naming the suite's splits otherwise)."""
        for s in self.splits:
            if s.name == name:
                return s
        raise KeyError(f"suite {self.name!r} has no split {name!r} (splits: {self.split_names})")

    def subset(self, names: list[str]) -> EvalSuite:
        """The suite restricted to ``names`` (in the given order); cross-split metrics whose splits are
        missing are dropped, headlines pointing at dropped keys too."""
        specs = [self.spec(n) for n in names]
        fq = self.forget_quality_split if self.forget_quality_split in names else None
        mia = self.mia if self.mia is not None and all(s in names for s in self.mia) else None
        util = [s for s in self.utility_splits if s in names]
        keep = set(expected_keys_for(specs, fq, mia, util))
        head = {k: v for k, v in self.headline.items() if v in keep}
        return EvalSuite(self.name, specs, fq, mia, util, head)

    def expected_keys(self) -> list[str]:
        """Every metric key this suite produces (per-split, cross-split and headline aliases)."""
        keys = expected_keys_for(self.splits, self.forget_quality_split, self.mia, self.utility_splits)
        return keys + [f"{self.name}/{h}" for h in self.headline]


def expected_keys_for(splits: list[SplitSpec], forget_quality_split: str | None, mia: tuple[str, str] | None,
                      utility_splits: list[str]) -> list[str]:
    """Per-split and cross-split metric keys (without headline aliases)."""
    keys = [f"{s.name}/{m}" for s in splits for m in s.metric_names()]
    if forget_quality_split:
        keys.append(f"{forget_quality_split}/forget_quality")
    if mia:
        keys += [f"{mia[0]}/mia_auc", f"{mia[0]}/privleak"]
    if utility_splits:
        keys.append("utility/model_utility")
    return keys


def embedded_suite(splits: list[str]) -> EvalSuite:
    """The embedded world's suite restricted to ``splits``: every metric on every split (as before suites),
    option probability on world facts, forget quality on forget, MIA forget vs holdout, utility from retain and
    world facts; no headline aliases (the embedded keys are unchanged)."""
    specs = [SplitSpec(s, truth_ratio=True, option_probability=s == "world_facts") for s in splits]
    names = set(splits)
    return EvalSuite(
        "embedded", specs,
        forget_quality_split="forget" if "forget" in names else None,
        mia=("forget", "holdout") if {"forget", "holdout"} <= names else None,
        utility_splits=[s for s in ("retain", "world_facts") if s in names],
    )


__all__ = ["CROSS_SPLIT_METRICS", "EvalSuite", "GENERATION_METRICS", "SplitSpec", "TEACHER_FORCED_METRICS",
           "embedded_suite", "expected_keys_for"]
