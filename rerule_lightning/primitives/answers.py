"""Judging a completion: the strict refusal detector and the fact matcher.

Both rewards (:mod:`rerule_lightning.rl.rewards`) and metrics (:mod:`rerule_lightning.evaluation.metrics`) import these,
so a reward pays for exactly what the headline metric measures: :func:`answer_correct` decides both the
embedded world's verifiable boundary reward and the evaluation's answer accuracy.

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

Fact matching
-------------
:func:`answer_correct`: the fact counts as stated when the fact value occurs in the completion as a substring
after both are case-folded and have whitespace runs collapsed, and the completion is not a refusal.
"""

from __future__ import annotations

import re
from collections.abc import Callable

RefusalFn = Callable[[str], bool]

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


def normalise_text(text: str) -> str:
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
    s = normalise_text(text)
    if _APOLOGY_ONLY.match(s):
        return True
    for _ in range(4):  # strip at most a few stacked lead-ins ("Well, I'm sorry, but ...")
        m = _LEAD_IN.match(s)
        if m is None or m.end() == 0:
            break
        s = s[m.end():]
    first = _SENTENCE_END.split(s, maxsplit=1)[0].strip()
    return any(p.match(first) for p in REFUSAL_PATTERNS.values())


def _norm_for_match(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def answer_correct(prediction: str, answer_value: str, refusal_fn: RefusalFn | None = None) -> bool:
    """Whether ``prediction`` states the reference fact and is not a refusal.

    The fact counts as stated when ``answer_value`` occurs in ``prediction`` as a substring after both are
    case-folded and have whitespace runs collapsed to single spaces. An empty (or whitespace-only)
    ``answer_value`` is never matched.

    Args:
        prediction: The completion.
        answer_value: The fact value (e.g. ``"Zanzibar"``), not the templated answer sentence.
        refusal_fn: Refusal detector; :func:`is_refusal` by default.
    """
    value = _norm_for_match(answer_value)
    if not value or value not in _norm_for_match(prediction):
        return False
    return not (refusal_fn or is_refusal)(prediction)


__all__ = ["REFUSAL_PATTERNS", "RefusalFn", "answer_correct", "is_refusal", "normalise_text"]
