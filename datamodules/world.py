"""The embedded fictitious world: a TOFU-like benchmark generated from a seed.

Authors live in *families* that share a surname. Every author has one fact of each kind in
:data:`FACT_KINDS` (birth city, birth year, genre, award, parent's profession, first book), drawn from
finite pools. Each fact comes with several question paraphrases, a canonical answer, a paraphrased answer
and perturbed answers (the paraphrased template with a wrong value from the same pool, as TOFU does), exactly the
columns TOFU ships (``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer``,
``paraphrased_question``), plus ``questions`` (every paraphrase) and ``value`` (the fact itself, which
answer accuracy looks for).

Partition of authors (fixed by the seed, identical in every preset):

* ``forget``: one member of each of ``num_forget_families`` families;
* ``boundary_hard``: the other members of those families (same surname, same question templates);
* ``boundary_easy``: ``num_boundary_easy_families`` unrelated families;
* ``retain``: the remaining families ("retain-only": never an RL prompt, so retain accuracy measures
  collateral damage on authors the unlearning never looked at);
* ``holdout``: authors generated with the same pools but never trained on (membership-inference
  non-members).

The target model learns forget + boundary + retain authors and the world facts; the retain model learns
everything but the forget authors.

Name collisions are parameters, not accidents of the seed. Forget authors' first names are used by no other
author except where a collision is asked for, so every boundary author has one ``collision`` type:

* ``surname``: a same-family (``boundary_hard``) author: shares the forget author's surname;
* ``both``: one of ``hard_first_name_collisions`` same-family authors who also bear the first name of *another*
  family's forget author (the hardest boundary: "Amara Bergstrom" beside forget authors "Esme Bergstrom"
  and "Amara Larkspur");
* ``first_name``: one of ``easy_first_name_collisions`` unrelated-family (``boundary_easy``) authors who bear a
  forget author's first name;
* ``none``: every other author (retain and holdout authors included); forget authors have ``forget``.

The counts hold for every world seed. Both presets' RL pools contain every RL prompt of a collision author
(3 per author with the default ``rl_fact_fraction``), so the ``hard`` pool holds the ``both`` authors'
prompts and both pools hold the ``first_name`` authors' prompts.

Presets choose the RL *boundary pool* (they never change the partition, so every number is comparable):

* ``easy``: boundary prompts come from ``boundary_easy`` authors only (no same-family authors);
* ``hard``: boundary prompts mix ``hard_fraction`` (default 20 %) of same-family prompts into the
  unrelated ones, so a uniformly sampled boundary batch rarely meets the hard cases.

RL may train on one fixed paraphrase (``rl_question_index``) of an ``rl_fact_fraction`` of each RL
author's facts (``rl_train``); evaluation always uses every paraphrase of every fact.

The pools, the templates and the rendering of one fact as a TOFU row are in :mod:`datamodules.world_text`
(re-exported here under their old names); this module is the generator: partition, families, collisions.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from datamodules.world_text import (  # noqa: F401  (re-exported: the names of datamodules.world before the split)
    AWARDS,
    BOOK_WORDS_A,
    BOOK_WORDS_B,
    CITIES,
    FACT_KINDS,
    FESTIVALS,
    FIRST_NAMES,
    GENRES,
    PROFESSIONS,
    REFUSAL_TEMPLATES,
    RIVERS,
    SURNAMES,
    WORLD_FACT_TEMPLATES,
    YEARS,
    FactKind,
    fact_row,
    value_pools,
)
from rerule_lightning.primitives.ranges import Count, Steps, UnitAboveZero, UnitOpen, range_errors

Preset = Literal["easy", "hard"]

# Bump when the generator's output changes for the same parameters: it is part of every cache key.
GENERATOR_VERSION = 3  # 3: name collisions are parameters (no accidental shared first names)


@dataclass
class WorldConfig:
    """Parameters of the generated world. Every field is checked in ``__post_init__``.

    Attributes:
        seed: Seed of the generator; the same seed and parameters give the same world, byte for byte.
        preset: ``easy`` (RL boundary pool without same-family authors) or ``hard`` (same-family authors
            make up ``hard_fraction`` of boundary prompts).
        num_families: Families of trained authors (each shares a surname).
        authors_per_family: Members per family; ``hard`` needs at least 2 (a forget author and a sibling).
        num_forget_families: Families that lose one member to the forget set.
        num_boundary_easy_families: Unrelated families whose members are boundary-easy authors.
        num_holdout_authors: Authors generated like the others but never trained on.
        num_world_facts: Facts about cities (not authors) that measure general utility.
        num_perturbed: Wrong answers per fact (same template, different value).
        rl_fact_fraction: Fraction of each RL author's facts that RL may train on (one paraphrase each).
        rl_question_index: Which paraphrase RL trains on; evaluation uses all of them.
        hard_fraction: Share of same-family prompts in the ``hard`` preset's boundary pool.
        hard_first_name_collisions: Same-family boundary authors who also bear another family's forget
            author's first name (collision type ``both``).
        easy_first_name_collisions: Unrelated-family boundary authors who bear a forget author's first name
            (collision type ``first_name``).
    """

    seed: int = 0
    preset: Preset = "hard"
    num_families: Count = 24
    authors_per_family: Count = 4
    num_forget_families: Count = 6
    num_boundary_easy_families: Steps = 12
    num_holdout_authors: Steps = 12
    num_world_facts: Steps = 12
    num_perturbed: Count = 3
    rl_fact_fraction: UnitAboveZero = 0.5
    rl_question_index: Steps = 0
    hard_fraction: UnitOpen = 0.2
    hard_first_name_collisions: Steps = 6
    easy_first_name_collisions: Steps = 2

    def __post_init__(self) -> None:
        errors = list(self.validation_errors())
        if errors:
            raise ValueError("invalid world parameters: " + "; ".join(errors))

    def validation_errors(self) -> list[str]:
        """Every problem with these parameters, each naming the parameter."""
        e: list[str] = []
        if self.preset not in ("easy", "hard"):
            e.append(f"preset={self.preset!r}: unknown preset (choose 'easy' or 'hard')")
        e += range_errors(WorldConfig, vars(self))
        if self.num_forget_families + self.num_boundary_easy_families > self.num_families:
            e.append(
                f"num_forget_families + num_boundary_easy_families = "
                f"{self.num_forget_families + self.num_boundary_easy_families} exceeds num_families={self.num_families}"
            )
        if self.preset == "hard" and self.authors_per_family < 2:
            e.append(f"authors_per_family={self.authors_per_family}: the 'hard' preset needs families of at "
                     "least 2 (a forget author and a same-family boundary author)")
        if self.num_families > len(SURNAMES):
            e.append(f"num_families={self.num_families}: at most {len(SURNAMES)} surnames are available")
        if self.authors_per_family > len(FIRST_NAMES):
            e.append(f"authors_per_family={self.authors_per_family}: at most {len(FIRST_NAMES)} first names")
        free_names = len(FIRST_NAMES) * len(SURNAMES) - self.num_families * self.authors_per_family
        if self.num_holdout_authors > free_names:  # otherwise the holdout name search never ends
            e.append(f"num_holdout_authors={self.num_holdout_authors}: at most {max(0, free_names)} unused names "
                     "are left for these family sizes")
        n_hard = self.num_forget_families * (self.authors_per_family - 1)
        if self.hard_first_name_collisions > n_hard:
            e.append(f"hard_first_name_collisions={self.hard_first_name_collisions}: only {n_hard} same-family "
                     "boundary authors exist")
        if self.hard_first_name_collisions > 0 and self.num_forget_families < 2:
            e.append(f"hard_first_name_collisions={self.hard_first_name_collisions}: needs num_forget_families >= 2 "
                     "(a sibling bears the first name of *another* family's forget author)")
        n_easy = self.num_boundary_easy_families * self.authors_per_family
        if self.easy_first_name_collisions > n_easy:
            e.append(f"easy_first_name_collisions={self.easy_first_name_collisions}: only {n_easy} unrelated-family "
                     "boundary authors exist")
        if self.authors_per_family > len(FIRST_NAMES) - self.num_forget_families:
            e.append(f"authors_per_family={self.authors_per_family}: at most {len(FIRST_NAMES) - self.num_forget_families} "
                     "first names are left once the forget authors' names are reserved")
        if self.rl_question_index >= min(len(k.questions) for k in FACT_KINDS):
            e.append(f"rl_question_index={self.rl_question_index}: each fact has only "
                     f"{min(len(k.questions) for k in FACT_KINDS)} paraphrases")
        if self.num_perturbed >= min(len(v) for v in value_pools().values()):
            e.append(f"num_perturbed={self.num_perturbed}: larger than the smallest value pool")
        if self.num_world_facts > len(CITIES) * len(WORLD_FACT_TEMPLATES):
            e.append(f"num_world_facts={self.num_world_facts}: at most {len(CITIES) * len(WORLD_FACT_TEMPLATES)}")
        return e

    def to_dict(self) -> dict:
        """Plain-dict form (for hashing and metadata)."""
        return asdict(self)

    def content_hash(self, include_preset: bool = True) -> str:
        """A short hash of the parameters; without the preset it identifies the *trained* content."""
        d = {**self.to_dict(), "generator_version": GENERATOR_VERSION}
        if not include_preset:
            for k in ("preset", "hard_fraction"):
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _name_families(cfg: WorldConfig, rng: random.Random, surnames: list[str], forget_fams: list[int],
                   easy_fams: list[int]) -> tuple[list[list[str]], dict[str, str]]:
    """Author names per family (member 0 of a forget family is its forget author) and each author's collision
    type; exactly the configured numbers of first-name collisions, no accidental ones."""
    forget_firsts = rng.sample(FIRST_NAMES, cfg.num_forget_families)
    first_of = dict(zip(forget_fams, forget_firsts, strict=True))
    free = [f for f in FIRST_NAMES if f not in set(forget_firsts)]
    hard_slots = [(fi, m) for fi in forget_fams for m in range(1, cfg.authors_per_family)]
    easy_slots = [(fi, m) for fi in easy_fams for m in range(cfg.authors_per_family)]
    forced: dict[tuple[int, int], str] = {}

    def force(slots: list[tuple[int, int]], count: int, options: Any, what: str) -> None:
        rng.shuffle(slots)
        done = 0
        for fi, m in slots:
            if done == count:
                break
            in_family = {first_of.get(fi)} | {v for (f, _), v in forced.items() if f == fi}
            choices = [f for f in options(fi) if f not in in_family]  # names stay distinct within a family
            if choices:
                forced[(fi, m)] = rng.choice(choices)
                done += 1
        if done < count:
            raise ValueError(f"{what}={count}: only {done} such collisions fit these family sizes")

    force(hard_slots, cfg.hard_first_name_collisions, lambda fi: [first_of[o] for o in forget_fams if o != fi],
          "hard_first_name_collisions")
    force(easy_slots, cfg.easy_first_name_collisions, lambda fi: forget_firsts, "easy_first_name_collisions")
    families: list[list[str]] = []
    collision_of: dict[str, str] = {}
    for fi, surname in enumerate(surnames[: cfg.num_families]):
        firsts = [first_of[fi] if fi in first_of and m == 0 else forced.get((fi, m)) for m in range(cfg.authors_per_family)]
        taken = {f for f in firsts if f}
        fill = iter(rng.sample([f for f in free if f not in taken], firsts.count(None)))
        firsts = [f or next(fill) for f in firsts]
        fam = [f"{f} {surname}" for f in firsts]
        for m, author in enumerate(fam):
            if fi in first_of:
                collision_of[author] = "forget" if m == 0 else ("both" if (fi, m) in forced else "surname")
            elif (fi, m) in forced:
                collision_of[author] = "first_name"
        families.append(fam)
    return families, collision_of


def generate_world(cfg: WorldConfig) -> dict[str, list[dict]]:
    """Generate every split of the world as lists of row dicts (deterministic in ``cfg``).

    Returns:
        Splits ``forget``, ``boundary_hard``, ``boundary_easy``, ``retain``, ``holdout``,
        ``world_facts`` (fact rows), ``rl_prompts`` (the configured preset's RL pool), ``rl_prompts_easy``
        and ``rl_prompts_hard`` (both presets' pools, so one prepared world serves both) and
        ``refusal_templates``.
    """
    rng = random.Random(cfg.seed)
    pools = value_pools()
    surnames = rng.sample(SURNAMES, cfg.num_families + 1)  # one extra surname family for holdout authors
    order = list(range(cfg.num_families))
    rng.shuffle(order)
    forget_fams = order[: cfg.num_forget_families]
    easy_fams = order[cfg.num_forget_families: cfg.num_forget_families + cfg.num_boundary_easy_families]
    families, collision_of = _name_families(cfg, rng, surnames, forget_fams, easy_fams)
    forget_firsts = {families[fi][0].split(" ", 1)[0] for fi in forget_fams}
    # Holdout authors: new first-name/surname pairs, one per person, never used by trained authors, never a
    # forget author's first name (so they add no collision).
    used = {a for fam in families for a in fam}
    free_firsts = [f for f in FIRST_NAMES if f not in forget_firsts]
    holdout: list[str] = []
    while len(holdout) < cfg.num_holdout_authors:
        cand = f"{rng.choice(free_firsts)} {rng.choice(SURNAMES)}"
        if cand not in used:
            used.add(cand)
            holdout.append(cand)

    roles: dict[str, tuple[str, int]] = {}
    for fi, fam in enumerate(families):
        if fi in forget_fams:
            roles[fam[0]] = ("forget", fi)
            for a in fam[1:]:
                roles[a] = ("boundary_hard", fi)
        elif fi in easy_fams:
            for a in fam:
                roles[a] = ("boundary_easy", fi)
        else:
            for a in fam:
                roles[a] = ("retain", fi)
    for i, a in enumerate(holdout):
        roles[a] = ("holdout", cfg.num_families + i)

    splits: dict[str, list[dict]] = {k: [] for k in ("forget", "boundary_hard", "boundary_easy", "retain", "holdout")}
    n_rl = max(1, round(cfg.rl_fact_fraction * len(FACT_KINDS)))
    for author, (role, fam_id) in roles.items():
        rl_kinds = set(rng.sample(range(len(FACT_KINDS)), n_rl))
        for ki, kind in enumerate(FACT_KINDS):
            value = rng.choice(pools[kind.name])
            splits[role].append(fact_row(
                kind, author, value, pools[kind.name], rng, cfg.num_perturbed,
                id=f"{role}/{author.replace(' ', '_').lower()}/{kind.name}",
                author=author, family=author.split(" ", 1)[1], family_id=fam_id, split=role,
                collision=collision_of.get(author, "none"),
                rl_train=role != "holdout" and ki in rl_kinds,
            ))

    world_facts: list[dict] = []
    cities = rng.sample(CITIES, len(CITIES))
    combos = [(c, k) for c in cities for k in WORLD_FACT_TEMPLATES][: cfg.num_world_facts]
    for city, kind in combos:
        value = rng.choice(pools[kind.name])
        world_facts.append(fact_row(
            kind, city, value, pools[kind.name], rng, cfg.num_perturbed,
            id=f"world_facts/{city.replace(' ', '_').lower()}/{kind.name}",
            author="", family="", family_id=-1, split="world_facts", rl_train=False,
        ))
    splits["world_facts"] = world_facts
    splits["rl_prompts"] = build_rl_pool(splits, cfg)
    splits["rl_prompts_easy"] = build_rl_pool(splits, replace(cfg, preset="easy"))
    if cfg.authors_per_family >= 2:
        splits["rl_prompts_hard"] = build_rl_pool(splits, replace(cfg, preset="hard"))
    splits["refusal_templates"] = [{"template": t} for t in REFUSAL_TEMPLATES]
    return splits


def build_rl_pool(splits: dict[str, list[dict]], cfg: WorldConfig) -> list[dict]:
    """The preset's RL prompts: forget and boundary questions (one paraphrase of the ``rl_train`` facts).

    ``easy`` takes boundary prompts from ``boundary_easy`` only. ``hard`` keeps every ``boundary_easy``
    prompt and adds as many ``boundary_hard`` prompts as make up ``hard_fraction`` of the boundary pool
    (all of them if there are fewer): every prompt of a ``both``-collision author, then others chosen
    deterministically from the seed.
    """
    rng = random.Random(cfg.seed + 1)
    qi = cfg.rl_question_index

    def rows(split: str, label: str) -> list[dict]:
        return [{
            "id": r["id"], "prompt_text": r["questions"][qi], "label": label, "kind": split,
            "reference": r["answer"], "target": r["author"], "value": r["value"], "collision": r["collision"],
        } for r in splits[split] if r["rl_train"]]

    forget = rows("forget", "forget")
    easy = rows("boundary_easy", "boundary")
    pool = forget + easy
    if cfg.preset == "hard":
        hard = rows("boundary_hard", "boundary")
        want = min(round(cfg.hard_fraction * len(easy) / (1 - cfg.hard_fraction)), len(hard))
        both = [r for r in hard if r["collision"] == "both"][:want]  # always in the pool: a stated count
        rest = [r for r in hard if r["collision"] != "both"]
        pool += both + rng.sample(rest, want - len(both))
    return pool
