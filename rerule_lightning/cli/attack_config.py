"""The settings of ``rerule attack`` (one dataclass per attack), each checked in ``__post_init__`` so that a bad
attack config fails with one line naming the key before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ATTACKS = ("sampling", "quantization", "relearning", "adversarial")
RELEARN_MODELS = ("model", "target", "retain")


def _positive_ints(name: str, values: list[int], increasing: bool = False) -> None:
    if not values or any(int(v) != v or v < 1 for v in values):
        raise ValueError(f"{name}={list(values)}: must be a non-empty list of integers >= 1")
    if increasing and list(values) != sorted(set(values)):
        raise ValueError(f"{name}={list(values)}: must be strictly increasing")


@dataclass
class SamplingAttack:
    """Sampling attack (leak@k): ``max(ks)`` completions per item, leak@k over the first k of them.

    Attributes:
        ks: Sample counts k of leak@k (forget: some sample states the fact; boundary: answer@k).
        temperature: Sampling temperature (the issue's attack: 1.0).
        top_p: Nucleus threshold (1.0: the full distribution).
        splits: Evaluation splits sampled (each must be one of ``data``'s ``eval_splits``).
        max_new_tokens: Tokens per sample; ``None`` uses the command's ``max_new_tokens``.
    """

    ks: list[int] = field(default_factory=lambda: [1, 8, 32])
    temperature: float = 1.0
    top_p: float = 1.0
    splits: list[str] = field(default_factory=lambda: ["forget", "boundary_hard", "boundary_easy"])
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        _positive_ints("sampling.ks", self.ks, increasing=True)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"sampling.temperature={self.temperature}: must be finite and > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not self.splits:
            raise ValueError("sampling.splits: give at least one split")


@dataclass
class QuantizationAttack:
    """Quantization attack: every metric of ``splits`` after weight quantization to each of ``bits``.

    Attributes:
        bits: Weight bit widths (8 and / or 4).
        backend: ``auto`` (bitsandbytes when it imports, else torch), ``bitsandbytes`` (LLM.int8 / NF4) or
            ``torch`` (per-row absmax round-to-nearest, weight-only); the one that ran is in attack.json.
        splits: Evaluation splits scored with the data's full suite (each one of ``data``'s ``eval_splits``).
    """

    bits: list[int] = field(default_factory=lambda: [8, 4])
    backend: str = "auto"
    splits: list[str] = field(default_factory=lambda: ["forget", "boundary_hard", "boundary_easy"])

    def __post_init__(self) -> None:
        bad = [b for b in self.bits if b not in (4, 8)]
        if not self.bits or bad:
            raise ValueError(f"quantization.bits={list(self.bits)}: each must be 4 or 8")
        if self.backend not in ("auto", "bitsandbytes", "torch"):
            raise ValueError(f"quantization.backend={self.backend!r}: choose 'auto', 'bitsandbytes' or 'torch'")
        if not self.splits:
            raise ValueError("quantization.splits: give at least one split")


@dataclass
class RelearningAttack:
    """Relearning attack: fine-tune on the first half of the forget targets, score both halves after each k.

    Attributes:
        steps: Cumulative optimizer step counts after which both halves are scored (5, 10, 25: 25 steps in all).
        peft: Fine-tuning modes run, each from the untouched model: ``lora`` and / or ``full``.
        learning_rate: Constant AdamW learning rate of full fine-tuning (the same for every method).
        lora_learning_rate: Constant AdamW learning rate of LoRA fine-tuning.
        batch_size: Question-answer pairs per step.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale alpha / r).
        split: Evaluation split whose items are halved and trained on (every paraphrase of a fact is a pair).
        group_by: Item column that defines the halves: ``target`` (authors) or ``id`` (items, for a corpus with
            one target such as MUSE).
        models: Which models are attacked: ``model`` (under test), ``target`` (before unlearning) and
            ``retain`` (never saw the forget set); ``target`` / ``retain`` need ``target_model`` / ``retain_model``.
        max_grad_norm: Gradient-norm clip (0 disables).
    """

    steps: list[int] = field(default_factory=lambda: [5, 10, 25])
    peft: list[str] = field(default_factory=lambda: ["lora", "full"])
    learning_rate: float = 1e-3
    lora_learning_rate: float = 1e-2
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    split: str = "forget"
    group_by: str = "target"
    models: list[str] = field(default_factory=lambda: ["model", "target", "retain"])
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _positive_ints("relearning.steps", self.steps, increasing=True)
        bad = [p for p in self.peft if p not in ("lora", "full")]
        if not self.peft or bad:
            raise ValueError(f"relearning.peft={list(self.peft)}: each must be 'lora' or 'full'")
        for name in ("learning_rate", "lora_learning_rate"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"relearning.{name}={v}: must be finite and > 0")
        for name in ("batch_size", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"relearning.{name}={getattr(self, name)}: must be >= 1")
        if self.group_by not in ("target", "id"):
            raise ValueError(f"relearning.group_by={self.group_by!r}: choose 'target' or 'id'")
        bad = [m for m in self.models if m not in RELEARN_MODELS]
        if not self.models or bad:
            raise ValueError(f"relearning.models={list(self.models)}: each must be one of {list(RELEARN_MODELS)}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"relearning.max_grad_norm={self.max_grad_norm}: must be finite and >= 0")


@dataclass
class AdversarialAttack:
    """Adversarial prompts: per kind, greedy answer accuracy and refusal on ``splits``.

    Attributes:
        kinds: Embedded world: any of ``prefix_injection``, ``affirmative_suffix``, ``role_play``,
            ``reverse_query``, ``in_context``, ``description``; RWKU ignores it and uses its own level-3 probes.
        splits: Embedded world: the splits whose facts are attacked (forget and boundary authors); RWKU:
            ``forget_level3``.
        num_demos: ``in_context``: demonstrations (other authors' facts of the same kind) before the question.
    """

    kinds: list[str] = field(default_factory=lambda: ["prefix_injection", "affirmative_suffix", "role_play",
                                                      "reverse_query", "in_context", "description"])
    splits: list[str] = field(default_factory=lambda: ["forget", "boundary_hard"])
    num_demos: int = 2

    def __post_init__(self) -> None:
        if self.num_demos < 1:
            raise ValueError(f"adversarial.num_demos={self.num_demos}: must be >= 1")
        from rerule_lightning.evaluation.attacks.prompts import ADVERSARIAL_KINDS

        bad = [k for k in self.kinds if k not in ADVERSARIAL_KINDS]
        if not self.kinds or bad:
            raise ValueError(f"adversarial.kinds={list(self.kinds)}: each must be one of {list(ADVERSARIAL_KINDS)}")
        if not self.splits:
            raise ValueError("adversarial.splits: give at least one split")
