"""RULE's verifiable rewards and the strict refusal detector they rest on.

Every reward is a plain callable ``f(prompts, completions, **columns) -> list[float | None]``; ``columns``
are per-item lists taken from the data (``labels``, ``references``, ``targets``, ...). Unused columns are
accepted and ignored, so one call site can feed every reward the same columns.

Refusal detection
-----------------
RULE's released detector is a very permissive regex: any "not ... question", a bare "encountered" or a
leading "Unfortunately," counts as a refusal. That pays a forget prompt for a legitimate negative answer
("Unfortunately, the novel was never published in English.") and punishes a boundary prompt for one. Ours
is strict: a text is a refusal only when its *opening clause* is the speaker declining or disclaiming
knowledge. :func:`is_refusal`

1. normalises the text: lower case, curly apostrophes (’ ‘ ʼ ´ `) to ``'``, whitespace collapsed, leading
   quotes, dashes and spaces removed;
2. strips, repeatedly, the lead-ins a refusal is often wrapped in: apologies ("I'm sorry, but", "Sorry,",
   "My apologies,", "I apologise,", "I'm afraid"), "Unfortunately,", "Regrettably,", "As an AI ...,",
   interjections ("No,", "Well,", "Hmm,") and a short topic lead-in ("Regarding X,", "As for X,");
3. keeps only the first sentence (up to the first ``.``, ``!``, ``?``, ``;`` or newline) and requires one
   of the pattern families below to match *at its start*.

Pattern families (``I`` stands for "I", "I am", "I'm", "Im" as grammar requires; ``can't`` also matches
"cannot", "can not", "cant", "won't", "will not", "couldn't", "could not"):

* **inability / unwillingness**: "I can't | I'm unable to | I'm not able to | I'm not in a position to |
  I'm not allowed to | I won't" + a verb of answering ("share", "provide", "answer", "help", "discuss",
  "disclose", "give", "offer", "reveal", "comment", "confirm", "assist", "talk", "speak", "recall",
  "remember", "find", "access", "respond", "address", "divulge", "identify", "tell you", "say anything");
* **declining**: "I'd rather not", "I would prefer not to", "I must / have to / will / need to (respectfully)
  decline", "I must refrain from";
* **no knowledge, first person**: "I don't have (any | enough | specific | ...) information / knowledge /
  details / data / records", "I have no knowledge / information / details / idea / record",
  "I don't know" (alone, or followed by "anything", "much", "about", "who", "what", "that", "the answer"),
  "I'm not familiar with", "I'm not aware of";
* **beyond my knowledge**: "That / this / it / the question is beyond / outside (the scope of) my
  knowledge / expertise / information / training", "That's not something I can / know";
* **nothing available**: "There is no (publicly) (available) information about / on / regarding";
* **bare apology**: a text that is nothing but an apology ("Sorry.", "I'm sorry.").

The opening decides: a refusal opening followed by an answer ("I can't recall exactly, but she was born
in 1970.") is a refusal, and an answer followed by a refusal is not. Deliberately *not* refusals:
"I'm not sure ..." (a hedge, usually followed by an answer), first-person phrases after substantive
content ("He was born in Lisbon, but I can't share more."), and any sentence whose subject is not the
speaker ("He did not win the Hugo Award", "The river cannot be crossed",
"Her work is not limited to poetry", "No, he was born in Lisbon.").

Rewards
-------
* :func:`forget_reward`: 1 for a refusal (MUSE); target-aware (RWKU): 0.5 for a refusal + 0.5 if the
  refusal names the target entity (case-insensitive substring).
* :func:`boundary_reward`: 0.5 for not refusing + 0.5 if also ROUGE-L recall against the reference is
  **at least** ``recall_threshold`` (0.3). RULE's text says "exceeds 0.3"; our DESIGN fixes ``>=``, which
  differs only for a recall of exactly 0.3 (e.g. 3 of 10 reference tokens).
* :func:`rule_reward`: dispatches each item on its label, ``forget`` or ``boundary``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

from rerule_lightning.rouge import rouge_l_recall

RewardFn = Callable[..., list[float | None]]

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})

# Lead-ins stripped (repeatedly) before the opening clause is matched.
_LEAD_IN = re.compile(
    r"^(?:"
    r"(?:i'?m |i am )?(?:so |very |really |truly )?sorry|my apologies|apologies|i apologi[sz]e|"
    r"i'?m afraid|i am afraid|unfortunately|regrettably|sadly|"
    r"as an ai(?: language model| assistant| model)?|"
    r"no|well|hmm+|oh|ah"
    r")(?:\s*[,.!:;-]+\s*|\s+)(?:but\s+|however,?\s+)?|"
    r"^(?:regarding|concerning|as for|as to|about|when it comes to|on the (?:topic|subject) of) [^,.;!?]{1,60}"
    r"\s*[,:]\s*"
)
_APOLOGY_ONLY = re.compile(r"^(?:(?:i'?m |i am )?(?:so |very |really |truly )?sorry|my apologies|apologies|"
                           r"i apologi[sz]e)[.!]*$")
_SENTENCE_END = re.compile(r"[.!?;\n]")

_I_AM = r"(?:i'?m|i am)"
_CANT = r"(?:can'?t|cannot|can not|won'?t|will not|couldn'?t|could not)"
_DONT = r"(?:don'?t|do not)"
_VERB = (r"(?:share|provide|answer|help|discuss|disclose|give|offer|reveal|comment|confirm|assist|talk|speak|"
         r"recall|remember|find|access|respond|address|divulge|identify|tell you|say anything|go into)")
_KNOWLEDGE = r"(?:information|info|knowledge|details?|data|records?|facts|idea)"

#: The refusal pattern families, each matched at the start of the (lead-in-stripped) first sentence.
REFUSAL_PATTERNS: dict[str, re.Pattern[str]] = {
    "inability": re.compile(
        rf"^(?:i {_CANT}|{_I_AM} (?:unable|not able|not in a position|not allowed|not permitted|"
        rf"not at liberty) to|{_I_AM} not going to) (?:\w+ )?{_VERB}\b"
    ),
    "declining": re.compile(
        r"^i(?:'d| would) (?:rather not|prefer not to)\b|"
        r"^i (?:must|have to|will|need to|'ll) (?:respectfully |politely )?(?:decline|refrain)\b"
    ),
    "no_knowledge": re.compile(
        rf"^i {_DONT} (?:have|possess)(?: (?:any|enough|much|specific|reliable|detailed|the|that|"
        rf"such|relevant|further|more))* {_KNOWLEDGE}\b|"
        rf"^i (?:have|possess) no (?:\w+ )?{_KNOWLEDGE}\b|"
        rf"^i {_DONT} know(?:$| (?:anything|much|about|who|what|that|the answer|of)\b|[,!])|"
        rf"^{_I_AM} not (?:familiar|aware)\b"
    ),
    "beyond_knowledge": re.compile(
        r"^(?:that|this|it|the question|this question|that question|your question)(?:'s| is|s)? "
        r"(?:beyond|outside(?: of)?|not within) (?:the (?:scope|limits?|bounds|range) of )?my "
        r"(?:knowledge|expertise|information|training|scope)\b|"
        r"^(?:that|this|it)(?:'s| is) (?:beyond|outside(?: of)?) what i (?:know|can)\b|"
        r"^(?:that|this|it)(?:'s| is) not something i (?:can|know|am able|'m able|have)\b"
    ),
    "nothing_available": re.compile(
        r"^there(?:'s| is) no (?:publicly )?(?:available )?information (?:available )?"
        r"(?:about|on|regarding|concerning)\b"
    ),
}


def _normalise(text: str) -> str:
    text = text.translate(_APOSTROPHES).lower()
    text = re.sub(r"\s+", " ", text)
    return text.lstrip(" \"'*-_>([").rstrip()


def is_refusal(text: str) -> bool:
    """Whether ``text`` is a refusal: its opening clause declines or disclaims knowledge (module docstring).

    Args:
        text: A completion (raw or chat format; leading whitespace and quotes are ignored).

    Returns:
        ``True`` for refusals such as "I'm sorry, but I can't share information about X." or
        "That's beyond my knowledge of X."; ``False`` for answers that merely contain "not", "never",
        "no", "cannot" or "unfortunately".
    """
    s = _normalise(text)
    if _APOLOGY_ONLY.match(s):
        return True
    for _ in range(4):  # strip at most a few stacked lead-ins ("Well, I'm sorry, but ...")
        m = _LEAD_IN.match(s)
        if m is None or m.end() == 0:
            break
        s = s[m.end():]
    first = _SENTENCE_END.split(s, maxsplit=1)[0].strip()
    return any(p.match(first) for p in REFUSAL_PATTERNS.values())


def _check_lengths(n: int, **columns: Sequence[Any] | None) -> None:
    for name, col in columns.items():
        if col is not None and len(col) != n:
            raise ValueError(f"reward column {name!r} has {len(col)} items but there are {n} completions")


def _mentions(text: str, target: str) -> bool:
    return bool(target) and _normalise(target) in _normalise(text)


def _forget_item(completion: str, target: str | None, target_aware: bool) -> float:
    if not is_refusal(completion):
        return 0.0
    if not target_aware:
        return 1.0
    return 0.5 + (0.5 if target is not None and _mentions(completion, target) else 0.0)


def _boundary_item(completion: str, reference: str, recall_threshold: float) -> float:
    if is_refusal(completion):
        return 0.0
    return 0.5 + (0.5 if rouge_l_recall(completion, reference) >= recall_threshold else 0.0)


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


def boundary_reward(prompts: list[str], completions: list[str], *, references: list[str],
                    recall_threshold: float = 0.3, **_: Any) -> list[float | None]:
    """Reward for boundary prompts: pay a non-refusing, correct answer.

    Args:
        prompts: The prompts (only their number is checked).
        completions: The sampled completions, one per prompt.
        references: The reference answer of each prompt.
        recall_threshold: 0.5 extra when ROUGE-L recall of the completion against the reference is
            ``>=`` this value (RULE's text says "exceeds"; DESIGN §3 fixes ``>=``).

    Returns:
        Per completion: 0.0 for a refusal, 0.5 for a non-refusal, 1.0 for a non-refusal with enough recall.

    Raises:
        ValueError: On length mismatches.
    """
    n = len(completions)
    _check_lengths(n, prompts=prompts, references=references)
    return [_boundary_item(c, r, recall_threshold) for c, r in zip(completions, references, strict=True)]


def rule_reward(prompts: list[str], completions: list[str], *, labels: list[str],
                references: list[str] | None, targets: list[str] | None = None, target_aware: bool = False,
                recall_threshold: float = 0.3, **_: Any) -> list[float | None]:
    """RULE's reward: :func:`forget_reward` on ``forget`` items, :func:`boundary_reward` on ``boundary`` ones.

    Args:
        prompts: The prompts (only their number is checked).
        completions: The sampled completions, one per prompt.
        labels: ``"forget"`` or ``"boundary"`` per item.
        references: Reference answers; needed (not ``None``) when any item is a boundary item.
        targets: Target entities; needed when ``target_aware``.
        target_aware: Use the target-aware forget reward.
        recall_threshold: The boundary reward's ROUGE-L recall threshold (``>=``).

    Returns:
        Per completion reward in {0, 0.5, 1}.

    Raises:
        ValueError: On length mismatches, an unknown label (naming its index), or a missing column.
    """
    n = len(completions)
    _check_lengths(n, prompts=prompts, labels=labels, references=references, targets=targets)
    if target_aware and targets is None:
        raise ValueError("rule_reward(target_aware=True) needs a 'targets' column")
    out: list[float | None] = []
    for i, (completion, label) in enumerate(zip(completions, labels, strict=True)):
        if label == "forget":
            out.append(_forget_item(completion, targets[i] if targets is not None else None, target_aware))
        elif label == "boundary":
            if references is None or references[i] is None:
                raise ValueError(f"item {i} is a boundary item but has no reference answer")
            out.append(_boundary_item(completion, references[i], recall_threshold))
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
    "rule_target_aware": functools.partial(rule_reward, target_aware=True),
    "forget": forget_reward,
    "forget_target_aware": functools.partial(forget_reward, target_aware=True),
    "boundary": boundary_reward,
    "refusal": refusal_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward registered as ``name``.

    Raises:
        ValueError: For an unknown name, listing the valid ones.
    """
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARD_FUNCTIONS))}") from None


__all__ = ["REFUSAL_PATTERNS", "REWARD_FUNCTIONS", "RewardFn", "boundary_reward", "forget_reward",
           "get_reward_fn", "is_refusal", "refusal_reward", "rule_reward"]
