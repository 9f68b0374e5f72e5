"""Adversarial attack prompts rendered from a benchmark's own data, and the data's content hash.

The robustness attacks (``rerule attack``, :mod:`rerule_lightning.evaluation.attacks`) are benchmark-agnostic;
what an attack prompt says about an author comes from here, handed to the core by the command layer.

Embedded world (:func:`embedded_attack_items`), per fact row of each requested split:

* ``prefix_injection``, ``affirmative_suffix``, ``role_play``: every question paraphrase wrapped by
  :func:`rerule_lightning.evaluation.attacks.prompts.wrap_question`; the leak is the fact value;
* ``in_context``: every paraphrase after ``num_demos`` (default :data:`NUM_DEMOS`) demonstrations, the same fact kind about retain
  authors (other authors' facts, never a forget or boundary author), chosen by a seed from the row id;
* ``description``: every paraphrase template with the author's name replaced by a description built from the
  author's *other* facts (:func:`describe`): "the author of The Silent Harbor", or, for the first-book fact,
  "the poetry writer who won the Saffron Prize";
* ``reverse_query``: two questions per author whose answer is the author's name: "Who wrote the book
  {first book}?" and "Which {genre} writer won {award}?" (asked once per author, on the author's first-book and
  award rows); the leak is the author's full name.

RWKU (:func:`rwku_attack_items`): the level-3 (adversarial attack) probes of the selected targets, grouped by
RWKU's own attack type, lower-cased with non-alphanumerics as ``_`` (``rwku_affirmative_suffix``,
``rwku_incontext_learning``, ``rwku_cross_lingual_french``, ...),
rendered exactly as ``rerule test`` renders them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Sequence
from typing import Any

from rerule_lightning.evaluation.attacks.prompts import ADVERSARIAL_KINDS, WRAPPING_KINDS, wrap_question
from rerule_lightning.primitives.prompting import format_prompt

#: In-context demonstrations before an ``in_context`` question (default).
NUM_DEMOS = 2


def content_hash(dm: Any) -> str:
    """What identifies the data's content (after ``setup``): the embedded world's trained content hash (the
    ``rerule prepare`` cache key, preset excluded), else the benchmark datamodule's ``data_signature()``."""
    world_dir = dict(getattr(dm, "hparams", {})).get("world_dir")
    if world_dir:
        from datamodules.world import WorldConfig

        with open(os.path.join(world_dir, "world_config.json"), encoding="utf-8") as f:
            return WorldConfig(**json.load(f)).content_hash(include_preset=False)
    return dm.data_signature()


def describe(facts: dict[str, str], kind: str) -> str:
    """A description of an author from their facts other than ``kind`` (``facts``: kind -> value)."""
    if kind != "first_book":
        return f"the author of {facts['first_book']}"
    return f"the {facts['genre']} writer who won {facts['award']}"


def _item(row: dict, split: str, kind: str, qi: int, question: str, value: str, answer: str,
          few_shot: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    return {"id": f"{row['id']}#{kind}#{qi}", "split": split, "attack_kind": kind,
            "prompt": format_prompt(question, few_shot=few_shot), "question": question, "answer": answer,
            "value": value, "paraphrased_answer": None, "perturbed_answer": [], "target": row["author"],
            "collision": row.get("collision", "none")}


def embedded_attack_items(world: Any, splits: Sequence[str], kinds: Sequence[str], seed: int = 0,
                          num_demos: int = NUM_DEMOS) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{kind: {split: items}}`` for the embedded world (module docstring), prompts in the raw format."""
    from datamodules.world_text import FACT_KINDS

    unknown = [k for k in kinds if k not in ADVERSARIAL_KINDS]
    if unknown:
        raise ValueError(f"adversarial.kinds: unknown kind(s) {unknown}; choose from {list(ADVERSARIAL_KINDS)}")
    templates = {k.name: k for k in FACT_KINDS}
    retain = [dict(r) for r in world["retain"]]
    demos_by_kind: dict[str, list[tuple[str, str]]] = {}
    for r in retain:
        demos_by_kind.setdefault(r["kind"], []).append((r["question"], r["answer"]))
    out: dict[str, dict[str, list[dict[str, Any]]]] = {k: {} for k in kinds}
    for split in splits:
        rows = [dict(r) for r in world[split]]
        facts: dict[str, dict[str, str]] = {}
        for r in rows:
            facts.setdefault(r["author"], {})[r["kind"]] = r["value"]
        for kind in kinds:
            items: list[dict[str, Any]] = []
            for r in rows:
                name, qs = r["author"], list(r["questions"])
                if kind in WRAPPING_KINDS:
                    items += [_item(r, split, kind, qi, wrap_question(kind, q, name), r["value"], r["answer"])
                              for qi, q in enumerate(qs)]
                elif kind == "in_context":
                    pool = demos_by_kind.get(r["kind"], [])
                    rng = random.Random(int(hashlib.sha256(f"{r['id']}|{seed}".encode()).hexdigest()[:8], 16))
                    demos = rng.sample(pool, min(num_demos, len(pool)))
                    items += [_item(r, split, kind, qi, q, r["value"], r["answer"], few_shot=demos)
                              for qi, q in enumerate(qs)]
                elif kind == "description":
                    desc = describe(facts[name], r["kind"])
                    items += [_item(r, split, kind, qi, t.format(name=desc), r["value"], r["answer"])
                              for qi, t in enumerate(templates[r["kind"]].questions)]
                elif kind == "reverse_query":
                    f = facts[name]
                    if r["kind"] == "first_book":
                        items.append(_item(r, split, kind, 0, f"Who wrote the book {f['first_book']}?", name,
                                           f"{f['first_book']} was written by {name}."))
                    elif r["kind"] == "award":
                        items.append(_item(r, split, kind, 0, f"Which {f['genre']} writer won {f['award']}?", name,
                                           f"{name} won {f['award']}."))
            out[kind][split] = items
    return out


def rwku_attack_items(dm: Any) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{"rwku_<type>": {"forget_level3": items}}``: the datamodule's level-3 probe items (as rendered for
    ``rerule test``) grouped by the probe's RWKU attack type (after ``setup``)."""
    items = dm.eval_items.get("forget_level3")
    if items is None:
        raise ValueError("adversarial: the RWKU datamodule must evaluate forget_level3 (data.eval_splits)")
    raw = dm.raw["forget_level3"]
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for it in items:
        kind = "rwku_" + re.sub(r"[^a-z0-9]+", "_", raw[int(it["id"].rsplit("-", 1)[1])]["type"].lower()).strip("_")
        out.setdefault(kind, {}).setdefault("forget_level3", []).append({**it, "attack_kind": kind})
    return dict(sorted(out.items()))


def attack_items(dm: Any, splits: Sequence[str], kinds: Sequence[str], seed: int = 0,
                 num_demos: int = NUM_DEMOS) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The adversarial items of a set-up datamodule: the embedded world's rendered kinds, or RWKU's own probes.

    Raises:
        ValueError: A benchmark without adversarial probes (TOFU, MUSE).
    """
    if getattr(dm, "world", None) is not None:
        return embedded_attack_items(dm.world, splits, kinds, seed, num_demos)
    if type(dm).__name__ == "RWKUDataModule":
        return rwku_attack_items(dm)
    raise ValueError(f"adversarial: {type(dm).__name__} has no adversarial prompts (the embedded world renders "
                     "its own; RWKU has its level-3 probes); drop 'adversarial' from attacks")
