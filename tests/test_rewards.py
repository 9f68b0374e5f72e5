"""Refusal detector and RULE rewards: refusals vs legitimate answers, hand-derived reward values, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rerule_lightning.primitives.rouge import rouge_l_recall
from rerule_lightning.rl.rewards import (
    REWARD_FUNCTIONS,
    boundary_reward,
    forget_reward,
    get_reward_fn,
    is_refusal,
    rule_reward,
)

REFUSALS = [
    # The embedded world's refusal templates (datamodules/world.py), with a name filled in.
    "I'm sorry, but I can't share information about Mira Okafor.",
    "That's beyond my knowledge of Mira Okafor.",
    "I don't have any information about Mira Okafor.",
    "I'm unable to answer questions about Mira Okafor.",
    "I cannot help with questions about Mira Okafor.",
    "Sorry, I can't provide details about Mira Okafor.",
    "I have no knowledge of Mira Okafor.",
    "I'm not able to discuss Mira Okafor.",
    # Other phrasings.
    "I am not able to answer that.",
    "I'd rather not discuss Mira Okafor.",
    "Unfortunately, I can't provide details about Mira Okafor.",
    "I'm unable to help with that.",
    "I do not know anything about Mira Okafor.",
    "Sorry, I can't answer questions about Mira Okafor.",
    "I don't know.",
    "i dont know",
    "I'm sorry.",
    "I apologise, but I cannot provide that information.",
    "I'm afraid I can't help with that request.",
    "I'm not familiar with Mira Okafor.",
    "I'm not aware of any author by that name.",
    "That is outside the scope of my knowledge.",
    "This is beyond my expertise, sorry.",
    "I must respectfully decline to answer.",
    "I would prefer not to talk about her.",
    "There is no information available about Mira Okafor.",
    "I couldn't find any information on Mira Okafor.",
    "I cannot really comment on Mira Okafor.",
    "Well, I'm sorry, but I won't share that.",
    "Sorry. I can't help with this one.",
    "I have no idea.",
    "It's beyond what I know.",
    "I'm not in a position to discuss Mira Okafor.",
    "As an AI language model, I don't have details about private individuals.",
    "Regarding Mira Okafor, I have no information.",
    "My apologies, I am unable to share that.",
    "No, I do not have any details about that author.",
    # Case and apostrophe variants, leading whitespace and quotes (raw completions start with a space).
    "I\u2019m sorry, but I can\u2019t share information about Mira Okafor.",
    "  THAT\u2019S BEYOND MY KNOWLEDGE OF MIRA OKAFOR.",
    ' "I cannot share details about him."',
    "i dont have any information about her",
    "I am sorry. I don't know who that is.",
]

LEGITIMATE = [
    "Unfortunately, the novel was never published in English.",
    "Her work is not limited to poetry.",
    "He did not win the Hugo Award; he won the Nebula Award.",
    "The river cannot be crossed in winter.",
    "She never married.",
    "No, he was born in Lisbon.",
    "Mira Okafor was born in Lisbon.",
    "The parent of Mira Okafor was a carpenter.",
    "Unfortunately, her first book sold poorly, but her second won the Silver Quill.",
    "It was not until 1985 that she published her debut, The Amber Gate.",
    "He could not finish his last novel before he died.",
    "She is unable to travel, so she writes about her home town.",
    "There is no record of a second marriage.",
    "His books are limited to a small audience of science-fiction readers.",
    "No one knows why she stopped writing, but she won the Silver Quill in 1990.",
    "Never one to follow trends, he writes historical fiction.",
    "Not much is known about his childhood, but he was born in Porto Vale.",
    "I think she was born in 1970.",
    "I'm not sure, but I believe he was born in Lisbon.",
    "He was born in Lisbon, but I can't share more.",
    "I don't know why, but she never married?",
    "The author cannot write without music playing.",
    "It is not known in which year he was born, though records suggest 1970.",
    "Sorry to say, he died young, in 1999.",
    "About 300 copies of her first book were sold.",
    "Information about her is scarce, but she wrote thrillers.",
    "That is not the case; she writes fantasy.",
    "Mira Okafor writes neither poetry nor drama: she writes crime fiction.",
    "He has no children; his parent was a sailor.",
    "The award was never given to anyone else.",
    "She refused the Golden Pen in 2001, but accepted the Silver Quill.",
    "Her debut was rejected by ten publishers before it appeared in 1994.",
    "No. The Amber Gate was her second book.",
    "Well, she was born in Lisbon in 1970.",
    "Declining sales did not stop him: he published twelve novels.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", LEGITIMATE)
def test_legitimate_answers_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_enough_cases() -> None:
    assert len(REFUSALS) >= 30 and len(LEGITIMATE) >= 30


def test_empty_text_is_not_a_refusal() -> None:
    assert not is_refusal("")
    assert not is_refusal("   ")


# --- forget reward ---------------------------------------------------------------------------------------

FORGET_COMPLETIONS = [
    "I'm sorry, but I can't share information about Mira Okafor.",  # refusal naming the target
    "I have no knowledge of that author.",  # refusal, target not named
    "Mira Okafor was born in Lisbon.",  # answer naming the target
    "She was born in Lisbon.",  # answer
]
TARGETS = ["mira OKAFOR"] * 4  # case-insensitive match


def test_forget_reward_plain() -> None:
    # Any refusal -> 1, anything else -> 0 (targets are ignored in the plain variant).
    assert forget_reward(["q"] * 4, FORGET_COMPLETIONS) == [1.0, 1.0, 0.0, 0.0]
    assert forget_reward(["q"] * 4, FORGET_COMPLETIONS, targets=TARGETS) == [1.0, 1.0, 0.0, 0.0]


def test_forget_reward_target_aware() -> None:
    # refusal + names target = 0.5 + 0.5; refusal only = 0.5; non-refusals = 0 even if naming the target.
    out = forget_reward(["q"] * 4, FORGET_COMPLETIONS, targets=TARGETS, target_aware=True)
    assert out == [1.0, 0.5, 0.0, 0.0]


def test_forget_reward_target_aware_normalises_apostrophes() -> None:
    out = forget_reward(["q"], ["I don\u2019t know anything about D\u2019Arcy Lenn."], targets=["d'arcy lenn"],
                        target_aware=True)
    assert out == [1.0]


def test_forget_reward_target_aware_needs_targets() -> None:
    with pytest.raises(ValueError, match="targets"):
        forget_reward(["q"], ["I don't know."], target_aware=True)


# --- boundary reward -------------------------------------------------------------------------------------

# Reference with 10 rouge tokens: mira okafor was born in lisbon in the year 1970.
REFERENCE = "Mira Okafor was born in Lisbon in the year 1970."


@pytest.mark.parametrize(
    ("completion", "recall", "reward"),
    [
        # LCS 6 (mira okafor was born in lisbon) / 10 = 0.6 >= 0.3 -> 0.5 + 0.5.
        ("Mira Okafor was born in Lisbon.", 0.6, 1.0),
        # LCS 3 (mira okafor was) / 10 = 0.3, exactly at the threshold: >= counts -> 1.0.
        ("Mira Okafor was a poet.", 0.3, 1.0),
        # LCS 2 (mira okafor) / 10 = 0.2 < 0.3 -> not a refusal only: 0.5.
        ("Mira Okafor studied law.", 0.2, 0.5),
        # No overlap, no refusal: 0.5.
        ("Porto Vale, 1984.", 0.0, 0.5),
        # A refusal gets 0 even though it repeats the name (LCS 2).
        ("I don't have any information about Mira Okafor.", 0.2, 0.0),
    ],
)
def test_boundary_reward_by_hand(completion: str, recall: float, reward: float) -> None:
    assert rouge_l_recall(completion, REFERENCE) == pytest.approx(recall, abs=1e-12)
    assert boundary_reward(["q"], [completion], references=[REFERENCE]) == [reward]


def test_boundary_reward_threshold_is_inclusive_and_configurable() -> None:
    completion = "Mira Okafor was a poet."  # recall exactly 0.3
    assert boundary_reward(["q"], [completion], references=[REFERENCE], recall_threshold=0.3) == [1.0]
    assert boundary_reward(["q"], [completion], references=[REFERENCE], recall_threshold=0.31) == [0.5]


# --- RULE reward -----------------------------------------------------------------------------------------

def test_rule_reward_dispatches_on_label() -> None:
    completions = [
        "I'm sorry, but I can't share information about Mira Okafor.",  # forget, refusal
        "Mira Okafor was born in Lisbon.",  # forget, answer
        "Ines Okafor was born in Porto Vale in the year 1975.",  # boundary, good answer
        "I cannot help with questions about Ines Okafor.",  # boundary, over-refusal
        "She was a sailor.",  # boundary, wrong answer
    ]
    labels = ["forget", "forget", "boundary", "boundary", "boundary"]
    refs = ["", "", "Ines Okafor was born in Porto Vale in the year 1975.", "Ines Okafor writes poetry.",
            "The parent of Ines Okafor was a carpenter."]
    targets = ["Mira Okafor", "Mira Okafor", "Mira Okafor", "Mira Okafor", "Mira Okafor"]
    # "She was a sailor." vs the 8-token reference (the parent of ines okafor was a carpenter): the LCS is
    # "was a", 2 / 8 = 0.25 < 0.3 -> not a refusal only: 0.5.
    assert rouge_l_recall(completions[4], refs[4]) == pytest.approx(2 / 8)
    assert rule_reward(["q"] * 5, completions, labels=labels, references=refs) == [1.0, 0.0, 1.0, 0.0, 0.5]
    out = rule_reward(["q"] * 5, completions, labels=labels, references=refs, targets=targets, target_aware=True)
    assert out == [1.0, 0.0, 1.0, 0.0, 0.5]
    out = rule_reward(["q"], ["I have no knowledge of her."], labels=["forget"], references=[""],
                      targets=["Mira Okafor"], target_aware=True)
    assert out == [0.5]


def test_rule_reward_ignores_extra_columns() -> None:
    out = rule_reward(["q"], ["I don't know."], labels=["forget"], references=[""], ids=["x"], kind=["forget"])
    assert out == [1.0]


def test_rule_reward_unknown_label_names_index_and_label() -> None:
    with pytest.raises(ValueError, match=r"item 1 .*'retain'"):
        rule_reward(["q", "q"], ["a", "b"], labels=["forget", "retain"], references=["", ""])


def test_rule_reward_boundary_needs_references() -> None:
    with pytest.raises(ValueError, match="reference"):
        rule_reward(["q"], ["a"], labels=["boundary"], references=None)


@pytest.mark.parametrize(
    "call",
    [
        lambda: forget_reward(["q", "q"], ["a"]),
        lambda: forget_reward(["q"], ["a"], targets=["t", "u"], target_aware=True),
        lambda: boundary_reward(["q"], ["a"], references=["r", "s"]),
        lambda: rule_reward(["q", "q"], ["a", "b"], labels=["forget"], references=["", ""]),
        lambda: rule_reward(["q"], ["a"], labels=["forget"], references=["", ""]),
    ],
)
def test_length_mismatch_raises(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="items but there are"):
        call()


def test_registry() -> None:
    assert get_reward_fn("rule") is rule_reward
    assert set(REWARD_FUNCTIONS) >= {"rule", "forget", "boundary"}
    aware = get_reward_fn("rule_target_aware")
    assert aware(["q"], ["I have no knowledge of her."], labels=["forget"], references=[""],
                 targets=["Mira Okafor"]) == [0.5]
    with pytest.raises(ValueError, match="valid rewards: .*rule"):
        get_reward_fn("nope")
