"""Unlearning metrics: torchmetrics ``Metric`` classes (DDP-correct) and their functional twins.

Generation metrics (greedy completions) live in :mod:`.text`, teacher-forced ones in :mod:`.likelihood`,
and the pure functions in :mod:`.functional`.
"""

from rerule_lightning.evaluation.metrics.base import Float64Metric, MeanOfItems
from rerule_lightning.evaluation.metrics.functional import (
    TOFU_MODEL_UTILITY_KEYS,
    answer_accuracy,
    answer_correct,
    answer_probability,
    auc_score,
    extraction_strength,
    fluency,
    forget_quality,
    forget_truth_ratio_agg,
    harmonic_mean,
    knowmem_scores,
    min_k_percent,
    model_utility,
    ngram_entropy,
    normalized_option_probability,
    privleak,
    refusal_rate,
    retain_truth_ratio_agg,
    rouge_l_f1_scores,
    rouge_l_recall_scores,
    truth_ratio,
    verbmem_scores,
)
from rerule_lightning.evaluation.metrics.likelihood import (
    AnswerProbability,
    ExtractionStrength,
    ForgetQuality,
    MembershipAUC,
    MinKPercent,
    PrivLeak,
    TruthRatio,
)
from rerule_lightning.evaluation.metrics.outputs import (
    OUTPUT_CLASSES,
    OutputClassRate,
    degenerate_reason,
    output_class,
    output_class_rates,
    output_classes,
    vocabulary_of,
)
from rerule_lightning.evaluation.metrics.text import (
    AnswerAccuracy,
    Fluency,
    RefusalRate,
    RougeLF1,
    RougeLRecall,
)

__all__ = [
    "OUTPUT_CLASSES", "OutputClassRate", "degenerate_reason", "output_class", "output_class_rates",
    "output_classes", "vocabulary_of",
    "TOFU_MODEL_UTILITY_KEYS", "AnswerAccuracy", "AnswerProbability", "ExtractionStrength", "Float64Metric",
    "Fluency", "ForgetQuality", "MeanOfItems", "MembershipAUC", "MinKPercent", "PrivLeak", "RefusalRate",
    "RougeLF1", "RougeLRecall", "TruthRatio", "answer_accuracy", "answer_correct", "answer_probability",
    "auc_score", "extraction_strength", "fluency", "forget_quality", "forget_truth_ratio_agg",
    "harmonic_mean", "knowmem_scores", "min_k_percent", "model_utility", "ngram_entropy",
    "normalized_option_probability", "privleak", "refusal_rate", "retain_truth_ratio_agg",
    "rouge_l_f1_scores", "rouge_l_recall_scores", "truth_ratio", "verbmem_scores",
]
