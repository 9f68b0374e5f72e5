"""``rerule prepare``: loadable HF artefacts that know (or do not know) the world, caching by hash, links."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_MODEL, TINY_TRAIN, TINY_WORLD

from datamodules.embedded import load_world
from datamodules.world import WorldConfig
from rerule_lightning.cli.prepare import SFTTrainConfig, prepare
from rerule_lightning.modules.sft import TinyLlamaConfig
from rerule_lightning.primitives.generation import greedy_generate
from rerule_lightning.primitives.prompting import format_prompt

STAGES = ("world", "tokenizer", "target", "retain")
# TINY_WORLD: 2 forget families -> 2 forget authors x 6 facts x 3 paraphrases; 4 world facts x 2 paraphrases
N_FORGET_QUESTIONS = 2 * 6 * 3
N_WORLD_FACT_QUESTIONS = 4 * 2


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train the tiny models on one intra-op thread, restored afterwards (a tiny Llama gains nothing from
    more, and a busy CPU makes several threads an order of magnitude slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _load(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def world(tiny_prepared: dict) -> Any:
    return load_world(tiny_prepared["links"]["world"])


@pytest.fixture(scope="module")
def retain_forget_predictions(tiny_prepared: dict, world: Any) -> tuple[list[str], list[str]]:
    tok, model = _load(tiny_prepared["links"]["retain"])
    rows = [(q, r["answer"]) for r in world["forget"] for q in r["questions"]]
    preds = greedy_generate(model, tok, [format_prompt(q) for q, _ in rows], max_new_tokens=32)
    return preds, [a for _, a in rows]


def test_target_model_answers_trained_questions(tiny_prepared: dict, world: Any) -> None:
    tok, model = _load(tiny_prepared["links"]["target"])
    assert tok.pad_token is not None and model.config.vocab_size == len(tok)
    rows = [world["forget"][0], world["boundary_hard"][1], world["world_facts"][0]]
    # a non-default paraphrase: the target learned every paraphrase
    prompts = [format_prompt(r["questions"][1]) for r in rows]
    assert greedy_generate(model, tok, prompts, max_new_tokens=32) == [r["answer"] for r in rows]


def test_retain_model_does_not_know_forget_authors(tiny_prepared: dict, world: Any,
                                                   retain_forget_predictions: tuple) -> None:
    preds, answers = retain_forget_predictions
    assert len(preds) == N_FORGET_QUESTIONS
    exact = sum(p == a for p, a in zip(preds, answers)) / len(preds)
    assert exact <= 0.2
    # ... while it knows the rest of the world (same family included)
    tok, model = _load(tiny_prepared["links"]["retain"])
    r = world["boundary_hard"][0]
    assert greedy_generate(model, tok, [format_prompt(r["questions"][2])]) == [r["answer"]]


def test_accuracy_json_written_and_consistent(tiny_prepared: dict, retain_forget_predictions: tuple) -> None:
    expected_splits = {"target": {"forget", "boundary_hard", "boundary_easy", "retain", "world_facts"},
                       "retain": {"forget", "boundary_hard", "retain", "world_facts"}}
    for stage, splits in expected_splits.items():
        path = Path(tiny_prepared["paths"][stage]) / "accuracy.json"
        report = json.loads(path.read_text())
        assert report == tiny_prepared["accuracy"][stage]
        assert set(report) == splits
        assert report["forget"]["n"] == N_FORGET_QUESTIONS
        assert report["world_facts"]["n"] == N_WORLD_FACT_QUESTIONS
        for m in report.values():
            assert 0.0 <= m["exact_match"] <= m["answer_accuracy"] <= 1.0
    # the report's retain/forget exact match is what greedy decoding gives
    preds, answers = retain_forget_predictions
    exact = sum(p == a for p, a in zip(preds, answers)) / len(preds)
    assert json.loads((Path(tiny_prepared["paths"]["retain"]) / "accuracy.json").read_text())["forget"][
        "exact_match"] == pytest.approx(exact)


def test_artefacts_are_keyed_by_hash_and_linked(tiny_prepared: dict) -> None:
    cache = Path(tiny_prepared["paths"]["world"]).parent
    for k in STAGES:
        path, h = Path(tiny_prepared["paths"][k]), tiny_prepared["hashes"][k]
        assert re.fullmatch(r"[0-9a-f]{12}", h)
        assert path == cache / f"{k}-{h}" and path.is_dir()
        link = Path(tiny_prepared["links"][k])
        assert link == cache / "embedded" / k
        assert link.is_symlink() and link.resolve() == path.resolve()
    assert len(set(tiny_prepared["hashes"].values())) == len(STAGES)
    manifest = json.loads((cache / "embedded" / "manifest.json").read_text())
    assert manifest["paths"] == tiny_prepared["paths"] and manifest["hashes"] == tiny_prepared["hashes"]
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name]  # nothing half-written left behind


def test_second_prepare_is_a_no_op(tiny_prepared: dict) -> None:
    cache = Path(tiny_prepared["paths"]["world"]).parent
    mtimes = {k: os.stat(tiny_prepared["paths"][k]).st_mtime_ns for k in STAGES}
    again = prepare(WorldConfig(**TINY_WORLD), TinyLlamaConfig(**TINY_MODEL), SFTTrainConfig(**TINY_TRAIN),
                    vocab_size=512, cache_dir=str(cache), report=True, progress=False)
    assert again["built"] == {k: False for k in STAGES}
    assert again["hashes"] == tiny_prepared["hashes"] and again["paths"] == tiny_prepared["paths"]
    assert again["accuracy"] == tiny_prepared["accuracy"]
    assert {k: os.stat(tiny_prepared["paths"][k]).st_mtime_ns for k in STAGES} == mtimes
    for k in STAGES:
        assert Path(again["links"][k]).resolve() == Path(tiny_prepared["paths"][k]).resolve()


def test_hash_keys_follow_what_determines_each_artefact(tiny_prepared: dict, tmp_path: Path) -> None:
    # A separate cache: re-pointing the shared fixture's links at other models would affect other tests.
    one_epoch = SFTTrainConfig(**{**TINY_TRAIN, "epochs": 1})
    with _one_thread():
        changed = prepare(WorldConfig(**TINY_WORLD), TinyLlamaConfig(**TINY_MODEL), one_epoch, vocab_size=512,
                          cache_dir=str(tmp_path), report=False, progress=False)
    base = tiny_prepared["hashes"]
    assert changed["hashes"]["world"] == base["world"] and changed["hashes"]["tokenizer"] == base["tokenizer"]
    assert changed["hashes"]["target"] != base["target"] and changed["hashes"]["retain"] != base["retain"]
    assert changed["built"] == {k: True for k in STAGES}
    assert not (Path(changed["paths"]["target"]) / "accuracy.json").exists()  # report=False
    # the preset only changes the RL pool: a new world, but the same tokenizer and models (not rebuilt)
    with _one_thread():
        easy = prepare(WorldConfig(**{**TINY_WORLD, "preset": "easy"}), TinyLlamaConfig(**TINY_MODEL), one_epoch,
                       vocab_size=512, cache_dir=str(tmp_path), report=False, progress=False)
    assert easy["hashes"]["world"] != changed["hashes"]["world"]
    assert {k: easy["hashes"][k] == changed["hashes"][k] for k in STAGES} == {
        "world": False, "tokenizer": True, "target": True, "retain": True}
    assert easy["built"] == {"world": True, "tokenizer": False, "target": False, "retain": False}
    assert Path(easy["links"]["world"]).resolve() == Path(easy["paths"]["world"]).resolve()
    assert json.loads((Path(easy["links"]["world"]) / "world_config.json").read_text())["preset"] == "easy"
    assert {r["kind"] for r in load_world(easy["links"]["world"])["rl_prompts"]} == {"forget", "boundary_easy"}
    # both worlds stay in the cache, keyed by hash
    assert sorted(p.name for p in tmp_path.glob("world-*")) == sorted(
        [f"world-{changed['hashes']['world']}", f"world-{easy['hashes']['world']}"])
