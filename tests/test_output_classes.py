"""Forget-output classification (refusal / correct / wrong / degenerate) on hand-made outputs, its metric and its
wiring into the evaluator; the selection / report halves of the embedded world."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from rerule_lightning.evaluation.metrics.outputs import (
    CLASS_METRICS,
    OutputClassRate,
    degenerate_reason,
    output_class,
    output_class_rates,
    output_classes,
    vocabulary_of,
    words,
)

VOCAB = vocabulary_of(["Mira Okafor was born in Lisbon.", "She writes poetry.", "I'm sorry, but I can't share that."])


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("  ...  ", "empty"), ("?!", "empty"),
    ("ryzibar.", "vocabulary"),                      # the audit's example: no word of the world
    ("ryzibar okafor qwe", "vocabulary"),            # 1 known of 3 < half
    ("Lisbon\x07.", "control"), ("born\u200bin", "control"), ("Lisbon \ufffd", "control"),
    ("\ue000 poetry", "control"),                    # private use
    ("the the the", "repetition"), ("born in born in born in Lisbon", "repetition"),
    ("poetry poetry", None),                         # two repeats are not three
    ("Mira was born in Lisbon.", None), ("She writes poetry\nand more", None),  # a newline is no control character; 3 known of 5
    ("Mira writes ryzibar.", None),                  # 2 known of 3: a fluent wrong answer
    ("born in x", None),                             # 2 of 3
    ("born x", None),                                # 1 of 2 is exactly half: not fewer than half
])
def test_degenerate_rules_with_a_vocabulary(text: str, reason: str | None) -> None:
    assert degenerate_reason(text, VOCAB) == reason


def test_degenerate_rules_without_a_vocabulary() -> None:
    assert degenerate_reason("ryzibar.") is None                   # no vocabulary: a made-up word reads as fluent
    assert degenerate_reason("#$%& ;; a1") == "symbols"            # 2 letters / digits of 8 visible characters
    assert degenerate_reason("ab%%") is None                       # 2 of 4 letters: exactly half is kept
    assert degenerate_reason("a%%%") == "symbols"
    assert degenerate_reason("1984.") is None                      # a year: digits count with letters
    assert degenerate_reason("go go go") == "repetition" and degenerate_reason("x\x00y") == "control"
    assert words("The author's   BOOK, 1970!") == ["the", "author's", "book", "1970"]


def test_classes_in_decision_order_and_exclusive() -> None:
    assert output_class("I'm sorry, but I can't share that.", "Lisbon", VOCAB) == "refusal"
    assert output_class("Mira was born in Lisbon.", "Lisbon", VOCAB) == "correct"
    assert output_class("Lisbon Lisbon Lisbon", "Lisbon", VOCAB) == "correct"   # states the fact: not degenerate
    assert output_class("Mira was born in Porto.", "Lisbon", VOCAB) == "wrong"   # 'porto' unknown: 4 of 5
    assert output_class("ryzibar.", "Lisbon", VOCAB) == "degenerate"
    assert output_class("ryzibar.", "Lisbon") == "wrong"                         # no vocabulary (real benchmarks)
    preds = ["I can't share that.", "Born in Lisbon.", "Born in Porto.", "ryzibar.", "\x07\x07", "Lisbon."]
    values = ["Lisbon"] * 6
    assert output_classes(preds, values, VOCAB) == ["refusal", "correct", "wrong", "degenerate", "degenerate",
                                                    "correct"]
    rates = output_class_rates(preds, values, VOCAB)
    assert rates == {"refusal_rate": 1 / 6, "answer_accuracy": 2 / 6, "degenerate_rate": 2 / 6,
                     "wrong_answer_rate": 1 / 6}
    assert math.fsum(rates.values()) == pytest.approx(1.0, abs=1e-15)
    assert set(rates) == set(CLASS_METRICS.values())
    assert all(math.isnan(v) for v in output_class_rates([], [], VOCAB).values())
    with pytest.raises(ValueError, match="same length"):
        output_classes(["a"], [], VOCAB)


def test_metric_matches_its_functional_twin_across_updates() -> None:
    preds = ["I can't share that.", "Born in Lisbon.", "Born in Porto.", "ryzibar.", "\x07\x07", "Lisbon."]
    values = ["Lisbon"] * 6
    deg, wrong = OutputClassRate("degenerate", VOCAB), OutputClassRate("wrong", VOCAB)
    for m in (deg, wrong):
        m.update(preds[:4], values[:4])
        m.update(preds[4:], values[4:])
    assert float(deg.compute()) == 2 / 6 and float(wrong.compute()) == 1 / 6
    with pytest.raises(ValueError, match="category='bad'"):
        OutputClassRate("bad")


def test_evaluator_logs_the_four_rates_on_every_split_and_they_sum_to_one(tiny_prepared: dict,
                                                                          one_torch_thread: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamodules.forget_retain import ForgetRetainDataModule
    from rerule_lightning.evaluation.evaluator import UnlearningEvaluator
    from rerule_lightning.modules.eval_hooks import evaluate_items

    links = tiny_prepared["links"]
    dm = ForgetRetainDataModule(world_dir=links["world"], eval_splits=["forget", "boundary_hard"], eval_max_items=6)
    dm.setup("test")
    model = AutoModelForCausalLM.from_pretrained(links["target"])
    tok = AutoTokenizer.from_pretrained(links["tokenizer"])
    ev = UnlearningEvaluator(dm.eval_suite, max_new_tokens=12, vocabulary=dm.eval_vocabulary())
    evaluate_items(ev, model, tok, dm.eval_items, 8)
    out = ev.compute()
    recs = ev.per_item()
    for s in ("forget", "boundary_hard"):
        keys = [f"{s}/{k}" for k in CLASS_METRICS.values()]
        assert all(k in out for k in keys)
        assert math.fsum(out[k] for k in keys) == pytest.approx(1.0, abs=1e-12)
        mine = [r for r in recs if r["split"] == s]
        assert out[f"{s}/degenerate_rate"] == sum(r["output_class"] == "degenerate" for r in mine) / len(mine)
        assert all((r["output_class"] == "correct") == r["correct"] for r in mine)
        assert all((r["output_class"] == "refusal") == r["refusal"] for r in mine)


# ------------------------------------------------------------------------------ selection / report halves
def test_halves_are_disjoint_balanced_stable_and_stored(tiny_prepared: dict, tmp_path: Path) -> None:
    from conftest import TINY_WORLD

    from datamodules.embedded import (
        EVAL_SPLITS,
        HALVES_FILE,
        derive_halves,
        load_world,
        save_world,
        world_halves,
    )
    from datamodules.world import WorldConfig

    src = tiny_prepared["links"]["world"]
    world = load_world(src)
    halves = world_halves(src, world)
    assert list(halves) == list(EVAL_SPLITS)
    for s, h in halves.items():
        keys = {r["author"] or r["id"] for r in world[s]}
        assert set(h["select"]).isdisjoint(h["report"]) and set(h["select"]) | set(h["report"]) == keys
        assert len(h["select"]) - len(h["report"]) in (0, 1)
    # a fresh save of the same world stores exactly these halves; a world of another seed gets others
    save_world(WorldConfig(**TINY_WORLD), str(tmp_path / "w"))
    stored = json.loads((tmp_path / "w" / HALVES_FILE).read_text())
    assert stored["splits"] == halves and world_halves(str(tmp_path / "w"), load_world(str(tmp_path / "w"))) == halves
    save_world(WorldConfig(**{**TINY_WORLD, "seed": 3}), str(tmp_path / "w3"))
    other = json.loads((tmp_path / "w3" / HALVES_FILE).read_text())
    assert other["content_hash"] != stored["content_hash"]
    assert derive_halves({s: list(world[s]) for s in EVAL_SPLITS}) == {"content_hash": stored["content_hash"],
                                                                       "splits": halves}
    # a stored file that disagrees with the content is an error naming it
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "w", bad)
    edited = dict(stored, splits={**stored["splits"], "forget": {"select": [], "report": []}})
    (bad / HALVES_FILE).write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"halves\.json: the stored selection / report halves do not match"):
        world_halves(str(bad), load_world(str(bad)))


def test_datamodule_evaluates_one_half(tiny_prepared: dict) -> None:
    from datamodules.forget_retain import ForgetRetainDataModule

    world = tiny_prepared["links"]["world"]
    dms = {h: ForgetRetainDataModule(world_dir=world, eval_splits=["forget", "boundary_hard"], eval_half=h)
           for h in ("all", "select", "report")}
    for dm in dms.values():
        dm.setup("validate")
    for s in ("forget", "boundary_hard"):
        ids = {h: {i["id"] for i in dm.eval_items[s]} for h, dm in dms.items()}
        assert ids["select"] and ids["report"] and ids["select"].isdisjoint(ids["report"])
        assert ids["select"] | ids["report"] == ids["all"]
        authors = {h: {i["target"] for i in dm.eval_items[s]} for h, dm in dms.items()}
        assert authors["select"].isdisjoint(authors["report"])  # by author: every paraphrase and fact together
    ref = dms["select"].reference_items()
    assert {i["target"] for i in ref.items["forget"]} == {i["target"] for i in dms["select"].eval_items["forget"]}
    with pytest.raises(ValueError, match=r"data.eval_half='half': choose 'all', 'select' or 'report'"):
        ForgetRetainDataModule(world_dir=world, eval_half="half")


def test_the_world_vocabulary_reaches_the_evaluator_of_every_datamodule(tiny_prepared: dict) -> None:
    from datamodules.embedded import load_world, world_vocabulary
    from datamodules.forget_retain import ForgetRetainDataModule
    from datamodules.paired import PairedUnlearningDataModule

    world = tiny_prepared["links"]["world"]
    vocab = world_vocabulary(load_world(world))
    inner = ForgetRetainDataModule(world_dir=world)
    assert inner.eval_vocabulary() == vocab and PairedUnlearningDataModule(inner).eval_vocabulary() == vocab
    w = load_world(world)
    row = w["forget"][0]
    assert set(words(row["answer"])) <= vocab and set(words(row["author"])) <= vocab
    assert {"sorry", "can't", "share"} <= vocab and "ryzibar" not in vocab
