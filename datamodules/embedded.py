"""Embedded world on disk: HF ``DatasetDict`` save/load, tokenizer training, SFT pairs for each stage."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from typing import Any, Literal

from datamodules.world import REFUSAL_TEMPLATES, WorldConfig, generate_world
from rerule_lightning.primitives.halves import hashed_halves
from rerule_lightning.primitives.prompting import format_answer, format_prompt

EVAL_SPLITS = ("forget", "boundary_hard", "boundary_easy", "retain", "world_facts", "holdout")
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
SftMode = Literal["target", "retain", "rejection_steering"]
#: The selection / report halves of every evaluation split, written beside the world by :func:`save_world`.
HALVES_FILE = "halves.json"
HALVES = ("select", "report")
SELECT_SALT = "select"  # the salt of the selection / report halves (the relearning halves use "relearn")


def save_world(cfg: WorldConfig, path: str) -> None:
    """Generate the world and save it as an HF ``DatasetDict`` (plus ``world_config.json``)."""
    from datasets import Dataset, DatasetDict

    splits = generate_world(cfg)
    dd = DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})
    dd.save_to_disk(path)
    with open(os.path.join(path, "world_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    with open(os.path.join(path, HALVES_FILE), "w") as f:
        json.dump(derive_halves(splits), f, indent=1, sort_keys=True)


def half_key(row: Mapping[str, Any]) -> str:
    """What a row is split by: its author (every fact of an author lands in one half), or its id when it has
    no author (world facts)."""
    return str(row.get("author") or row["id"])


def world_content_hash(splits: Mapping[str, Any]) -> str:
    """sha256 of the evaluation splits' rows (id, author, questions, answer, value), in id order: the same for
    the same world content however it was saved."""
    rows = sorted(([s, r["id"], r.get("author") or "", list(r["questions"]), r["answer"], r["value"]]
                   for s in EVAL_SPLITS if s in splits for r in splits[s]), key=lambda x: (x[0], x[1]))
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def derive_halves(splits: Mapping[str, Any]) -> dict[str, Any]:
    """The selection / report halves of every evaluation split, by author (:func:`half_key`).

    Within each split the keys are ordered by ``sha256(key | world content hash | "select")`` and the first
    ``ceil(n / 2)`` form the selection half, the rest the report half: disjoint, balanced, a pure function of the
    world's content (so an already-prepared world gets the halves a fresh one stores).

    Returns:
        ``{"content_hash": ..., "splits": {split: {"select": [keys], "report": [keys]}}}``, keys sorted.
    """
    content = world_content_hash(splits)
    out: dict[str, Any] = {}
    for s in EVAL_SPLITS:
        if s not in splits:
            continue
        select, report = hashed_halves([half_key(r) for r in splits[s]], content, SELECT_SALT)
        out[s] = {"select": select, "report": report}
    return {"content_hash": content, "splits": out}


def world_halves(path: str, world: Any) -> dict[str, dict[str, list[str]]]:
    """The halves of the world saved at ``path`` (loaded as ``world``): ``halves.json`` when the world has one
    (checked against the content), else derived the same way (worlds saved before halves were stored).

    Raises:
        ValueError: ``halves.json`` disagrees with the world's content (naming the file).
    """
    derived = derive_halves({s: list(world[s]) for s in EVAL_SPLITS if s in world})
    file = os.path.join(path, HALVES_FILE)
    if os.path.isfile(file):
        with open(file) as f:
            stored = json.load(f)
        if stored != derived:
            raise ValueError(f"{file}: the stored selection / report halves do not match the world's content "
                             "(a world edited after `rerule prepare`?): prepare it again")
    return derived["splits"]


def world_vocabulary(world: Any) -> frozenset[str]:
    """Every word the world's models were trained on or refuse with (questions, answers, paraphrased and
    perturbed answers, refusal templates): the vocabulary of the degenerate-output rule
    (:func:`rerule_lightning.evaluation.metrics.outputs.degenerate_reason`)."""
    from rerule_lightning.evaluation.metrics.outputs import vocabulary_of

    texts: list[str] = []
    for name in world:
        for r in world[name]:
            if "questions" in r:
                texts += [*r["questions"], r["answer"], r["paraphrased_answer"] or "", *(r["perturbed_answer"] or [])]
            if "template" in r:
                texts.append(r["template"])
    authors = {r["author"] for s in EVAL_SPLITS if s in world for r in world[s] if r.get("author")}
    return vocabulary_of(texts) | vocabulary_of(authors)


def load_world(path: str) -> Any:
    """Load a saved world (``DatasetDict``) and check its files and schema.

    Raises:
        FileNotFoundError: The directory is missing.
        ValueError: A file is not UTF-8 / JSON, cannot be read, or a split has a missing / mistyped /
            empty field or a duplicate id (the message names the file, split, row and field).
    """
    from datasets import load_from_disk

    from rerule_lightning.cli.validation import check_json_files, validate_world

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"world directory {path!r} not found: run `rerule prepare --config configs/embedded/prepare.yaml`"
        )
    check_json_files(path)
    try:
        world = load_from_disk(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"world directory {path!r} could not be read ({type(e).__name__}: {e})") from None
    validate_world(world, path)
    return world


def world_texts(splits: dict[str, list[dict]]) -> list[str]:
    """Every string the models will see (prompts, answers, perturbed answers, refusals) for the tokenizer."""
    out: list[str] = []
    for name, rows in splits.items():
        if name == "refusal_templates":
            continue
        for r in rows:
            if "questions" in r:
                out += [format_prompt(q) for q in r["questions"]]
                out += [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
                out += [t.format(name=r["author"]) for t in REFUSAL_TEMPLATES if r["author"]]
    return out


def train_tokenizer(texts: list[str], path: str, vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as an HF ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # padding_side goes to the constructor: set as an attribute afterwards it is not saved (transformers 5)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL_TOKENS)
    fast.save_pretrained(path)
    return fast


def sft_pairs(world: Any, mode: SftMode, *, seed: int = 0, refusal_fraction: float = 1.0,
              retain_anchor_ratio: float = 1.0) -> list[dict[str, str]]:
    """Prompt/completion pairs for one SFT stage.

    Args:
        world: The loaded ``DatasetDict``.
        mode: ``target`` (every trained author and world fact, every paraphrase), ``retain`` (the same
            without the forget authors), or ``rejection_steering`` (refusal targets for a fraction of the
            forget questions, every paraphrase eligible, one refusal template per forget author, plus a
            retain anchor).
        seed: Sampling seed for rejection steering.
        refusal_fraction: Fraction of the forget (fact, paraphrase) questions given a refusal target.
        retain_anchor_ratio: Retain question-answer pairs mixed in per refusal pair (0 = refusal-only SFT).
            The anchor comes from unrelated authors (``boundary_easy``, ``retain``) and world facts, never
            from the forget author's family.
    """
    if mode in ("target", "retain"):
        splits = ["boundary_hard", "boundary_easy", "retain", "world_facts"]
        if mode == "target":
            splits.insert(0, "forget")
        return [{"prompt": format_prompt(q), "completion": format_answer(r["answer"])}
                for s in splits for r in world[s] for q in r["questions"]]
    if mode != "rejection_steering":
        raise ValueError(f"mode={mode!r}: choose 'target', 'retain' or 'rejection_steering'")
    if not 0.0 < refusal_fraction <= 1.0:
        raise ValueError(f"refusal_fraction={refusal_fraction}: must be in (0, 1]")
    if retain_anchor_ratio < 0:
        raise ValueError(f"retain_anchor_ratio={retain_anchor_ratio}: must be >= 0")
    rng = random.Random(seed)
    templates = [r["template"] for r in world["refusal_templates"]]
    # one refusal template per forget author: a consistent target is what a small model can learn
    authors = sorted({r["author"] for r in world["forget"]})
    refusal_of = {a: rng.choice(templates).format(name=a) for a in authors}
    forget = [(q, r["author"]) for r in world["forget"] for q in r["questions"]]
    forget = rng.sample(forget, max(1, round(refusal_fraction * len(forget))))
    pairs = [{"prompt": format_prompt(q), "completion": format_answer(refusal_of[a])} for q, a in forget]
    anchor_pool = [r for s in ("boundary_easy", "retain", "world_facts") for r in world[s]]
    n_anchor = round(retain_anchor_ratio * len(pairs))
    for r in (rng.choices(anchor_pool, k=n_anchor) if anchor_pool else []):
        pairs.append({"prompt": format_prompt(rng.choice(r["questions"])), "completion": format_answer(r["answer"])})
    rng.shuffle(pairs)
    return pairs
