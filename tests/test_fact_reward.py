"""The embedded world's verifiable boundary reward: it checks the fact value with the metric's own rule.

RULE's ROUGE check pays a wrong fact in the right template (recall 0.75 ≥ 0.3); ``verify="fact"`` pays only the
stated fact, decided by the very function behind the evaluation's answer accuracy.
"""

from __future__ import annotations

import random

import pytest
import torch

import rerule_lightning.evaluation.metrics.functional as MF
from rerule_lightning.primitives import answers
from rerule_lightning.rl import rewards
from rerule_lightning.rl.rewards import boundary_reward, get_reward_fn, rule_reward

REF = "Idris Achterberg was born in Zanzibar."
FACT = get_reward_fn("rule_fact")


@pytest.mark.parametrize("completion,reward", [
    (" Idris Achterberg was born in Zanzibar.", 1.0),   # correct value
    (" idris achterberg was born in  zanzibar", 1.0),   # case / whitespace do not matter (the metric's rule)
    (" Idris Achterberg was born in Hobart.", 0.5),     # wrong value, right template
    (" Ingrid Achterberg was born in Hobart.", 0.5),    # a sibling's fact, wrong value
    (" Zanzibar", 1.0),                                  # the value alone states the fact
    ("I'm sorry, but I can't share information about Idris Achterberg.", 0.0),  # refusal
    ("I don't know. Idris Achterberg was born in Zanzibar.", 0.0),  # a refusal opening, even with the fact
    ("", 0.5),                                           # empty: not a refusal, not the fact
])
def test_fact_reward_by_hand(completion: str, reward: float) -> None:
    assert FACT(["q"], [completion], labels=["boundary"], references=[REF], values=["Zanzibar"]) == [reward]
    # the ROUGE form (RULE on free text) pays the wrong template in full: why the embedded world cannot use it
    if reward == 0.5 and completion.strip():
        assert rule_reward(["q"], [completion], labels=["boundary"], references=[REF]) == [1.0]


def test_forget_items_are_unchanged_by_fact_verification() -> None:
    texts = ["I have no knowledge of Idris.", " Idris Achterberg was born in Zanzibar."]
    assert FACT(["q"] * 2, texts, labels=["forget"] * 2, values=["Zanzibar"] * 2) == [1.0, 0.0]
    assert FACT(["q"] * 2, texts, labels=["forget"] * 2, values=["Zanzibar"] * 2) == \
        rule_reward(["q"] * 2, texts, labels=["forget"] * 2, references=[REF] * 2)


def test_fact_reward_errors_name_the_column_and_item() -> None:
    with pytest.raises(ValueError, match="item 1 .* no fact value .*verify='rouge'"):
        FACT(["q"] * 2, ["a", "b"], labels=["forget", "boundary"], values=["", ""])
    with pytest.raises(ValueError, match="needs a 'values' column"):
        boundary_reward(["q"], ["a"], verify="fact")
    with pytest.raises(ValueError, match="verify='exact'"):
        rule_reward(["q"], ["a"], labels=["boundary"], references=[REF], verify="exact")
    assert get_reward_fn("boundary_fact")(["q"], [" Zanzibar!"], values=["Zanzibar"]) == [1.0]


def test_reward_and_metric_share_one_matching_function() -> None:
    assert rewards.answer_correct is answers.answer_correct is MF.answer_correct
    rng = random.Random(0)
    cities = ["Zanzibar", "Hobart", "Porto", "Quebec City"]
    texts = [f" Idris Achterberg was born in {rng.choice(cities)}." for _ in range(30)]
    texts += ["I'm unable to answer questions about Idris Achterberg.", "Unfortunately, he was born in Porto."]
    values = [rng.choice(cities) for _ in texts]
    got = FACT(["q"] * len(texts), texts, labels=["boundary"] * len(texts), values=values)
    flags = MF.answer_correct_flags(texts, values)  # what answer_accuracy averages
    refused = MF.refusal_flags(texts)
    assert got == [0.0 if r else 0.5 + 0.5 * c for r, c in zip(refused, flags, strict=True)]
    assert 0.0 < sum(flags) < len(flags)  # both outcomes occur


def test_fact_reward_on_completions_sampled_from_the_prepared_models(tiny_prepared: dict) -> None:
    """Real completions: the tiny target answers its boundary facts; judged against the right value, a
    sibling's value and a refusal, the reward follows the metric's flags exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamodules.embedded import load_world
    from rerule_lightning.primitives.generation import greedy_generate
    from rerule_lightning.primitives.prompting import format_prompt

    links = tiny_prepared["links"]
    world = load_world(links["world"])
    rows = [r for r in world["boundary_hard"] if r["rl_train"]][:6]
    model = AutoModelForCausalLM.from_pretrained(links["target"]).eval()
    tok = AutoTokenizer.from_pretrained(links["target"])
    torch.manual_seed(0)
    texts = greedy_generate(model, tok, [format_prompt(r["questions"][0]) for r in rows], 24, 8)
    right = [r["value"] for r in rows]
    got = FACT(["q"] * len(rows), texts, labels=["boundary"] * len(rows), values=right)
    assert got == [0.0 if MF.refusal_flags([t])[0] else 0.5 + 0.5 * MF.answer_correct(t, v)
                   for t, v in zip(texts, right, strict=True)]
    assert got == [1.0] * len(rows)  # the target memorised every fact (prepare's exact-match check)
    # the same completions judged against a sibling's (different) value of the same kind: 0.5 each
    others = []
    for r in rows:
        sib = next(o for o in [*world["boundary_hard"], *world["forget"]]
                   if o["kind"] == r["kind"] and o["family"] == r["family"] and o["value"] not in texts[rows.index(r)])
        others.append(sib["value"])
    assert FACT(["q"] * len(rows), texts, labels=["boundary"] * len(rows), values=others) == [0.5] * len(rows)
    refusal = world["refusal_templates"][0]["template"].format(name=rows[0]["author"])
    assert FACT(["q"], [refusal], labels=["boundary"], values=right[:1]) == [0.0]
