"""World tokenizer, SFT loss / tokenisation / collation, and the SFT pairs of each stage."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from datamodules.embedded import (
    SPECIAL_TOKENS,
    load_world,
    save_world,
    sft_pairs,
    train_tokenizer,
    world_texts,
)
from datamodules.world import CITIES, REFUSAL_TEMPLATES, WorldConfig, generate_world
from rerule_lightning.modules.sft import IGNORE_INDEX, collate_right_padded, sft_loss, tokenize_pair
from rerule_lightning.primitives.prompting import format_answer, format_prompt

# 5 families of 3: 2 forget authors, 4 boundary-hard, 6 boundary-easy, 3 retain; 4 world facts.
WORLD = dict(seed=0, num_families=5, authors_per_family=3, num_forget_families=2, num_boundary_easy_families=2,
             num_holdout_authors=3, num_world_facts=4, hard_first_name_collisions=2)
FACTS, PARAPHRASES, WORLD_PARAPHRASES = 6, 3, 2
N_FORGET_Q = 2 * FACTS * PARAPHRASES  # 36
N_TARGET = (2 + 4 + 6 + 3) * FACTS * PARAPHRASES + 4 * WORLD_PARAPHRASES  # 278
N_RETAIN = N_TARGET - N_FORGET_Q  # 242


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("world-tok")
    cfg = WorldConfig(**WORLD)
    save_world(cfg, str(root / "world"))
    train_tokenizer(world_texts(generate_world(cfg)), str(root / "tok"), vocab_size=512)
    return {"root": root, "world": load_world(str(root / "world")),
            "tok": AutoTokenizer.from_pretrained(str(root / "tok")), "splits": generate_world(cfg)}


def _questions(world: Any, *splits: str) -> dict[str, dict]:
    """format_prompt(question) -> its row, for every paraphrase of every row of ``splits``."""
    return {format_prompt(q): r for s in splits for r in world[s] for q in r["questions"]}


# ------------------------------------------------------------------------------------------------ world I/O
def test_saved_world_round_trips(saved: dict) -> None:
    world, splits = saved["world"], saved["splits"]
    assert set(world.keys()) == set(splits)
    for name in ("forget", "holdout", "world_facts", "rl_prompts", "rl_prompts_easy", "refusal_templates"):
        assert [dict(r) for r in world[name]] == splits[name], name
    assert (saved["root"] / "world" / "world_config.json").is_file()


def test_load_world_missing_directory_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="rerule prepare"):
        load_world(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_every_world_string(saved: dict) -> None:
    tok = saved["tok"]
    texts = world_texts(saved["splits"]) + list(CITIES) + ["Kraków", "Valparaíso", "Tromsø", "Gdańsk",
                                                            "children's literature", "Ünïcödé ☃ not in the world"]
    bad = [t for t in texts if tok.decode(tok.encode(t, add_special_tokens=False)) != t]
    assert bad == []
    # the non-ASCII cities survive inside a full prompt/answer as well
    s = format_prompt("In which city was Mira Okafor born?") + format_answer("Mira Okafor was born in Valparaíso.")
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_tokenizer_special_tokens(saved: dict) -> None:
    tok = saved["tok"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"], SPECIAL_TOKENS["pad_token"])
    ids = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert len(set(ids)) == 3 and all(i is not None for i in ids)
    # each special token is one id, never split into bytes
    enc = tok.encode("<|bos|>Kraków<|eos|><|pad|>", add_special_tokens=False)
    assert enc[0] == tok.bos_token_id and enc[-2:] == [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(enc, skip_special_tokens=True) == "Kraków"
    # plain text never produces a special id
    plain = tok.encode("Question: Where was Mira Okafor born?\nAnswer: Kraków.", add_special_tokens=False)
    assert not set(plain) & set(ids)
    assert tok.padding_side == "left"  # saved with the tokenizer, as generation pads prompts on the left


# -------------------------------------------------------------------------------------------------- sft_loss
def test_sft_loss_uniform_logits_is_log_vocab() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 1]])  # [B=1, L=4]: 2 prompt, 2 answer tokens
    assert sft_loss(torch.zeros(1, 4, 3), labels).item() == pytest.approx(math.log(3))


def test_sft_loss_hand_computed_and_blind_to_prompt_positions() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 1]])
    logits = torch.zeros(1, 4, 3)
    # position 1 predicts label[2] = 2 with uniform logits: -log(1/3)
    # position 2 predicts label[3] = 1 with logits (0, log 2, 0): p = 2/4 -> -log(1/2)
    logits[0, 2] = torch.tensor([0.0, math.log(2.0), 0.0])
    expected = (math.log(3) + math.log(2)) / 2
    base = sft_loss(logits, labels)
    assert base.item() == pytest.approx(expected)
    # position 0 predicts a prompt token, position 3 predicts nothing: their logits do not matter
    changed = logits.clone()
    changed[0, 0] = torch.tensor([9.0, -4.0, 1.5])
    changed[0, 3] = torch.tensor([-7.0, 3.0, 8.0])
    assert sft_loss(changed, labels).item() == pytest.approx(expected)
    # ...but the last prompt position predicts the first answer token, so it does
    moved = logits.clone()
    moved[0, 1] = torch.tensor([0.0, 0.0, 5.0])
    assert sft_loss(moved, labels).item() < expected


def test_sft_loss_is_a_token_mean_over_the_batch() -> None:
    # row 0: one answer token at uniform logits (log 3); row 1: two answer tokens at p = 1/2 (log 2 each)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX],
                           [IGNORE_INDEX, 1, 1, IGNORE_INDEX]])
    logits = torch.zeros(2, 4, 3)
    logits[1, 0] = torch.tensor([0.0, math.log(2.0), 0.0])
    logits[1, 1] = torch.tensor([0.0, math.log(2.0), 0.0])
    expected = (math.log(3) + 2 * math.log(2)) / 3
    assert sft_loss(logits, labels).item() == pytest.approx(expected)
    assert sft_loss(logits.to(torch.bfloat16), labels).dtype == torch.float32


# ------------------------------------------------------------------------------------- tokenize_pair, collate
def test_tokenize_pair_masks_exactly_the_prompt(saved: dict) -> None:
    tok = saved["tok"]
    prompt, completion = format_prompt("Where was Mira Okafor born?"), format_answer("Mira Okafor was born in Kraków.")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    ex = tokenize_pair(tok, prompt, completion, max_length=128)
    n_prompt = 1 + len(p_ids)  # bos + prompt
    assert ex["input_ids"] == [tok.bos_token_id, *p_ids, *c_ids, tok.eos_token_id]
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == [*c_ids, tok.eos_token_id]
    assert tok.decode(ex["labels"][n_prompt:-1]) == completion


def test_tokenize_pair_over_max_length_raises_naming_it(saved: dict) -> None:
    tok = saved["tok"]
    prompt, completion = format_prompt("Where was Mira Okafor born?"), format_answer("In Kraków.")
    n = len(tokenize_pair(tok, prompt, completion, max_length=1000)["input_ids"])
    assert len(tokenize_pair(tok, prompt, completion, max_length=n)["input_ids"]) == n  # exactly at the limit
    with pytest.raises(ValueError, match=rf"max_length={n - 1}"):
        tokenize_pair(tok, prompt, completion, max_length=n - 1)


def test_collate_right_padded() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
             {"input_ids": [5, 8, 9, 10, 11], "labels": [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11]}]
    out = collate_right_padded(batch, pad_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7, 2, 2], [5, 8, 9, 10, 11]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
                                      [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# --------------------------------------------------------------------------------------------- target/retain
def test_target_pairs_cover_every_paraphrase_of_every_trained_fact(saved: dict) -> None:
    world = saved["world"]
    pairs = sft_pairs(world, "target")
    assert len(pairs) == N_TARGET
    expected = _questions(world, "forget", "boundary_hard", "boundary_easy", "retain", "world_facts")
    assert len(expected) == N_TARGET  # every (fact, paraphrase) prompt is distinct
    assert {p["prompt"] for p in pairs} == set(expected)
    for p in pairs:
        assert p["completion"] == " " + expected[p["prompt"]]["answer"]
    assert not {p["prompt"] for p in pairs} & set(_questions(world, "holdout"))


def test_retain_pairs_are_target_minus_forget_authors(saved: dict) -> None:
    world = saved["world"]
    target, retain = sft_pairs(world, "target"), sft_pairs(world, "retain")
    assert len(retain) == N_RETAIN
    forget_q = set(_questions(world, "forget"))
    assert len(forget_q) == N_FORGET_Q
    assert [p for p in target if p["prompt"] not in forget_q] == retain
    forget_authors = {r["author"] for r in world["forget"]}
    assert not any(a in p["prompt"] or a in p["completion"] for p in retain for a in forget_authors)


def test_unknown_mode_fails(saved: dict) -> None:
    with pytest.raises(ValueError, match="mode="):
        sft_pairs(saved["world"], "bogus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- rejection steering
def _split_rs(world: Any, pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    forget_q = _questions(world, "forget")
    return [p for p in pairs if p["prompt"] in forget_q], [p for p in pairs if p["prompt"] not in forget_q]


@pytest.mark.parametrize("fraction,ratio,n_ref,n_anchor",
                         [(1.0, 1.0, 36, 36), (0.5, 1.0, 18, 18), (0.5, 0.5, 18, 9), (0.25, 2.0, 9, 18),
                          (0.5, 0.0, 18, 0), (0.001, 0.0, 1, 0)])
def test_rejection_steering_counts(saved: dict, fraction: float, ratio: float, n_ref: int, n_anchor: int) -> None:
    pairs = sft_pairs(saved["world"], "rejection_steering", refusal_fraction=fraction, retain_anchor_ratio=ratio)
    refusals, anchors = _split_rs(saved["world"], pairs)
    assert (len(refusals), len(anchors)) == (n_ref, n_anchor)
    assert len({p["prompt"] for p in refusals}) == n_ref  # each forget question at most once


def test_rejection_steering_refusals_name_the_forget_author(saved: dict) -> None:
    world = saved["world"]
    forget_q = _questions(world, "forget")
    pairs = sft_pairs(world, "rejection_steering", refusal_fraction=1.0, retain_anchor_ratio=1.0)
    refusals, _ = _split_rs(world, pairs)
    assert {p["prompt"] for p in refusals} == set(forget_q)  # fraction 1: every (fact, paraphrase)
    by_author = defaultdict(set)
    for p in refusals:
        author = forget_q[p["prompt"]]["author"]
        assert author in p["completion"]
        assert p["completion"] in {format_answer(t.format(name=author)) for t in REFUSAL_TEMPLATES}
        by_author[author].add(p["completion"])
    assert all(len(c) == 1 for c in by_author.values())  # one consistent refusal per author


def test_rejection_steering_anchor_never_from_forget_family(saved: dict) -> None:
    world = saved["world"]
    allowed = _questions(world, "boundary_easy", "retain", "world_facts")
    forbidden = set(_questions(world, "forget", "boundary_hard"))
    forget_surnames = {r["family"] for r in world["forget"]}
    for seed in range(3):
        _, anchors = _split_rs(world, sft_pairs(world, "rejection_steering", seed=seed, refusal_fraction=1.0,
                                                retain_anchor_ratio=2.0))
        assert len(anchors) == 2 * N_FORGET_Q
        for p in anchors:
            assert p["prompt"] not in forbidden and p["prompt"] in allowed
            assert p["completion"] == " " + allowed[p["prompt"]]["answer"]
            assert not any(s in p["prompt"] for s in forget_surnames)


def test_rejection_steering_refusal_only(saved: dict) -> None:
    world = saved["world"]
    forget_q = _questions(world, "forget")
    pairs = sft_pairs(world, "rejection_steering", refusal_fraction=0.5, retain_anchor_ratio=0.0)
    assert pairs and all(p["prompt"] in forget_q for p in pairs)
    assert all(forget_q[p["prompt"]]["author"] in p["completion"] for p in pairs)


def test_rejection_steering_is_seeded(saved: dict) -> None:
    world = saved["world"]
    a = sft_pairs(world, "rejection_steering", seed=1, refusal_fraction=0.5)
    assert a == sft_pairs(world, "rejection_steering", seed=1, refusal_fraction=0.5)
    assert a != sft_pairs(world, "rejection_steering", seed=2, refusal_fraction=0.5)


@pytest.mark.parametrize("kwargs,param", [(dict(refusal_fraction=0.0), "refusal_fraction"),
                                          (dict(refusal_fraction=1.5), "refusal_fraction"),
                                          (dict(retain_anchor_ratio=-0.5), "retain_anchor_ratio")])
def test_rejection_steering_invalid_arguments(saved: dict, kwargs: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        sft_pairs(saved["world"], "rejection_steering", **kwargs)


# ------------------------------------------------------------------------------------------------ datamodule
def test_sft_datamodule_serves_masked_right_padded_batches(saved: dict) -> None:
    from datamodules.sft import EmbeddedSFTDataModule

    root = saved["root"]
    dm = EmbeddedSFTDataModule(world_dir=str(root / "world"), tokenizer=str(root / "tok"), mode="retain",
                               batch_size=16)
    dm.setup("fit")
    assert len(dm.examples) == N_RETAIN
    batch = next(iter(dm.train_dataloader()))
    tok = saved["tok"]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 16
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids[:, 0] == tok.bos_token_id).all()  # right padding: every row starts with bos
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == tok.pad_token_id).all()
    # each row's last real token is eos, and is a label
    last = mask.sum(1) - 1
    assert (ids[torch.arange(16), last] == tok.eos_token_id).all()
    assert (labels[torch.arange(16), last] == tok.eos_token_id).all()
    with pytest.raises(ValueError, match="batch_size"):
        EmbeddedSFTDataModule(batch_size=0)
