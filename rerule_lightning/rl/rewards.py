"""RULE's verifiable rewards and the strict refusal detector they rest on.

Every reward is a plain callable ``f(prompts, completions, **columns) -> list[float | None]``; ``columns``
are per-item lists taken from the data (``labels``, ``references``, ``targets``, ...). Unused columns are
accepted and ignored, so one call site can feed every reward the same columns.

The refusal detector and the fact matcher live in :mod:`rerule_lightning.primitives.answers` (shared with the
metrics, so a reward pays for exactly what the metric measures); ``is_refusal`` is re-exported here.

Rewards
-------
* :func:`forget_reward`: 1 for a refusal (MUSE); target-aware (RWKU): 0.5 for a refusal + 0.5 if the
  refusal names the target entity (case-insensitive substring).
* :func:`boundary_reward`: 0.5 for not refusing + 0.5 if the answer is *verified*. ``verify="rouge"`` (RULE,
  free-text benchmarks: TOFU, MUSE, RWKU): ROUGE-L recall against the reference is **at least**
  ``recall_threshold`` (0.3). RULE's text says "exceeds 0.3"; our DESIGN fixes ``>=``, which differs only for a
  recall of exactly 0.3 (e.g. 3 of 10 reference tokens). ``verify="fact"`` (the embedded world, whose answers
  are templated sentences, so a wrong city in the right template still has ROUGE-L recall 0.75): the completion
  states the fact value, by :func:`rerule_lightning.primitives.answers.answer_correct`, the very function the evaluation's
  answer accuracy uses, so the reward pays exactly for what the headline metric measures.
* :func:`rule_reward`: dispatches each item on its label, ``forget`` or ``boundary``; registered as ``rule``
  (ROUGE verification, ``rouge_score`` semantics), ``rule_rwku`` (``verify="rouge_rwku"``: ROUGE-L recall as RWKU
  and RULE compute it, the ``rouge`` package's, :func:`rerule_lightning.primitives.rouge.rwku_rouge_l`) and ``rule_fact``
  (fact verification) in :data:`REWARD_FUNCTIONS`.

Open rewards
------------
A config's ``reward`` names a registered reward or any importable function with the same TRL-style contract,
``module.path:function`` (or ``module.path.function``); several rewards combine with weights
(:class:`WeightedReward`). A reward returns ``None`` for an item it does not apply to: the weighted sum skips it
(TRL's ``nansum``), and an item no reward applies to is *not applicable*: it is left out of its group's mean and
std and gets advantage 0 (:func:`rerule_lightning.rl.grpo.group_advantages` with a mask), instead of counting as a
reward of 0.0. A float NaN is not "not applicable": it is a non-finite reward and skips the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

from rerule_lightning.primitives.answers import REFUSAL_PATTERNS, answer_correct, is_refusal, normalise_text
from rerule_lightning.primitives.rouge import rouge_l_recall

RewardFn = Callable[..., list[float | None]]
Verify = Literal["rouge", "rouge_rwku", "fact"]
VERIFY_MODES = ("rouge", "rouge_rwku", "fact")

def _check_lengths(n: int, **columns: Sequence[Any] | None) -> None:
    for name, col in columns.items():
        if col is not None and len(col) != n:
            raise ValueError(f"reward column {name!r} has {len(col)} items but there are {n} completions")


def _mentions(text: str, target: str) -> bool:
    return bool(target) and normalise_text(target) in normalise_text(text)


def _forget_item(completion: str, target: str | None, target_aware: bool) -> float:
    if not is_refusal(completion):
        return 0.0
    if not target_aware:
        return 1.0
    return 0.5 + (0.5 if target is not None and _mentions(completion, target) else 0.0)


def _boundary_item(completion: str, reference: str | None, value: str | None, recall_threshold: float,
                   verify: Verify) -> float:
    if is_refusal(completion):
        return 0.0
    if verify == "fact":
        return 1.0 if answer_correct(completion, value or "", refusal_fn=lambda _: False) else 0.5
    impl = "rwku" if verify == "rouge_rwku" else "rouge_score"  # RWKU's own ROUGE on RWKU (as RULE scores it)
    return 1.0 if rouge_l_recall(completion, reference or "", impl) >= recall_threshold else 0.5


def _check_verify(verify: str, references: Sequence[Any] | None, values: Sequence[Any] | None, fn: str) -> None:
    if verify not in VERIFY_MODES:
        raise ValueError(f"{fn}(verify={verify!r}): choose {' or '.join(VERIFY_MODES)}")
    column = values if verify == "fact" else references
    name = "values" if verify == "fact" else "references"
    if column is None:
        raise ValueError(f"{fn}(verify={verify!r}) needs a {name!r} column")


def _boundary_checked(i: int, completion: str, references: Sequence[Any] | None, values: Sequence[Any] | None,
                      recall_threshold: float, verify: Verify) -> float:
    if verify == "fact":
        value = values[i] if values is not None else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"item {i} is a boundary item but has no fact value (column 'values'), which "
                             "verify='fact' checks; use verify='rouge' (reward: rule) for free-text answers")
        return _boundary_item(completion, None, value, recall_threshold, verify)
    if references is None or references[i] is None:
        raise ValueError(f"item {i} is a boundary item but has no reference answer")
    return _boundary_item(completion, references[i], None, recall_threshold, verify)


def forget_reward(prompts: list[str], completions: list[str], *, targets: list[str] | None = None,
                  target_aware: bool = False, **_: Any) -> list[float | None]:
    """Reward for forget prompts: pay a refusal.

    Args:
        prompts: The prompts (only their number is checked).
        completions: The sampled completions, one per prompt.
        targets: The entity each prompt is about; required when ``target_aware``.
        target_aware: RWKU variant: 0.5 for a refusal + 0.5 if the refusal names the target
            (case-insensitive substring). A non-refusal gets 0 even if it names the target.

    Returns:
        Per completion: 1.0 / 0.0, or 0.0 / 0.5 / 1.0 in the target-aware variant.

    Raises:
        ValueError: On length mismatches, or ``target_aware`` without ``targets``.
    """
    n = len(completions)
    _check_lengths(n, prompts=prompts, targets=targets)
    if target_aware and targets is None:
        raise ValueError("forget_reward(target_aware=True) needs a 'targets' column")
    return [_forget_item(c, targets[i] if targets is not None else None, target_aware)
            for i, c in enumerate(completions)]


def boundary_reward(prompts: list[str], completions: list[str], *, references: list[str] | None = None,
                    values: list[str] | None = None, recall_threshold: float = 0.3, verify: Verify = "rouge",
                    **_: Any) -> list[float | None]:
    """Reward for boundary prompts: pay a non-refusing, verified answer.

    Args:
        prompts: The prompts (only their number is checked).
        completions: The sampled completions, one per prompt.
        references: The reference answer of each prompt (``verify="rouge"``).
        values: The fact value of each prompt (``verify="fact"``), e.g. ``"Zanzibar"``.
        recall_threshold: ``verify="rouge"``: 0.5 extra when ROUGE-L recall of the completion against the
            reference is ``>=`` this value (RULE's text says "exceeds"; DESIGN §3 fixes ``>=``).
        verify: ``rouge`` (RULE, free text) or ``fact`` (the completion states the fact value, by
            :func:`rerule_lightning.primitives.answers.answer_correct`, the answer-accuracy metric's rule).

    Returns:
        Per completion: 0.0 for a refusal, 0.5 for a non-refusal, 1.0 for a non-refusal that is verified.

    Raises:
        ValueError: On length mismatches, an unknown ``verify``, or a missing reference / value.
    """
    n = len(completions)
    _check_lengths(n, prompts=prompts, references=references, values=values)
    _check_verify(verify, references, values, "boundary_reward")
    return [_boundary_checked(i, c, references, values, recall_threshold, verify) for i, c in enumerate(completions)]


def rule_reward(prompts: list[str], completions: list[str], *, labels: list[str],
                references: list[str] | None = None, values: list[str] | None = None,
                targets: list[str] | None = None, target_aware: bool = False,
                recall_threshold: float = 0.3, verify: Verify = "rouge", **_: Any) -> list[float | None]:
    """RULE's reward: :func:`forget_reward` on ``forget`` items, :func:`boundary_reward` on ``boundary`` ones.

    Args:
        prompts: The prompts (only their number is checked).
        completions: The sampled completions, one per prompt.
        labels: ``"forget"`` or ``"boundary"`` per item.
        references: Reference answers; needed for boundary items when ``verify="rouge"``.
        values: Fact values; needed for boundary items when ``verify="fact"``.
        targets: Target entities; needed when ``target_aware``.
        target_aware: Use the target-aware forget reward.
        recall_threshold: The boundary reward's ROUGE-L recall threshold (``>=``, ``verify="rouge"``).
        verify: How a boundary answer is verified: ``rouge`` (RULE) or ``fact`` (the embedded world).

    Returns:
        Per completion reward in {0, 0.5, 1}.

    Raises:
        ValueError: On length mismatches, an unknown label (naming its index), or a missing column.
    """
    n = len(completions)
    _check_lengths(n, prompts=prompts, labels=labels, references=references, values=values, targets=targets)
    if target_aware and targets is None:
        raise ValueError("rule_reward(target_aware=True) needs a 'targets' column")
    if verify not in VERIFY_MODES:
        raise ValueError(f"rule_reward(verify={verify!r}): choose {' or '.join(VERIFY_MODES)}")
    out: list[float | None] = []
    for i, (completion, label) in enumerate(zip(completions, labels, strict=True)):
        if label == "forget":
            out.append(_forget_item(completion, targets[i] if targets is not None else None, target_aware))
        elif label == "boundary":
            out.append(_boundary_checked(i, completion, references, values, recall_threshold, verify))
        else:
            raise ValueError(f"item {i} has unknown label {label!r}: expected 'forget' or 'boundary'")
    return out


def refusal_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
    """1.0 for a refusal, else 0.0, whatever the label (a diagnostic; equals the MUSE forget reward)."""
    _check_lengths(len(completions), prompts=prompts)
    return [1.0 if is_refusal(c) else 0.0 for c in completions]


#: Rewards by the name configs use.
REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "rule": rule_reward,
    "rule_fact": functools.partial(rule_reward, verify="fact"),
    "rule_rwku": functools.partial(rule_reward, verify="rouge_rwku"),
    "rule_target_aware": functools.partial(rule_reward, target_aware=True),
    "forget": forget_reward,
    "forget_target_aware": functools.partial(forget_reward, target_aware=True),
    "boundary": boundary_reward,
    "boundary_fact": functools.partial(boundary_reward, verify="fact"),
    "refusal": refusal_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward registered as ``name``, or the function at the import path ``name`` (``pkg.mod:fn`` or
    ``pkg.mod.fn``).

    Raises:
        ValueError: For an unknown name or an import path that does not resolve to a callable, saying why.
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" not in name and "." not in name:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARD_FUNCTIONS))}, or an "
                         "import path 'package.module:function'")
    import importlib

    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    return fn


class WeightedReward:
    """Several rewards as one: Σ_f w_f r_f per item over the rewards that apply (return a value) to it.

    Args:
        fns: The reward functions (TRL-style contract).
        weights: One weight per function (default: all 1).
        names: Their config names, for error messages.
    """

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> None:
        weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
        if len(weights) != len(fns):
            raise ValueError(f"reward_weights has {len(weights)} weights but there are {len(fns)} rewards")
        self.fns, self.weights = list(fns), weights
        self.names = list(names) if names is not None else [getattr(f, "__name__", repr(f)) for f in fns]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        """Per item the weighted sum of the applicable rewards, ``None`` where none applies."""
        out: list[float | None] = [None] * len(completions)
        for fn, w, name in zip(self.fns, self.weights, self.names):
            values = fn(prompts, completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            for i, v in enumerate(values):
                if v is not None:
                    out[i] = (out[i] or 0.0) + w * float(v)
        return out


def build_reward(reward: str | Sequence[str], weights: Sequence[float] | None = None) -> RewardFn:
    """The reward of a config: one name / import path, or several combined by :class:`WeightedReward`.

    Raises:
        ValueError: For an unresolvable entry (naming it) or a weight count that does not match.
    """
    names = [reward] if isinstance(reward, str) else list(reward)
    if not names:
        raise ValueError("reward: give at least one reward")
    fns = [get_reward_fn(n) for n in names]
    if len(fns) == 1 and weights is None:
        return fns[0]
    return WeightedReward(fns, weights, names)


__all__ = ["REFUSAL_PATTERNS", "REWARD_FUNCTIONS", "VERIFY_MODES", "RewardFn", "Verify", "WeightedReward",
           "boundary_reward", "build_reward", "forget_reward", "get_reward_fn", "is_refusal", "refusal_reward",
           "rule_reward"]
