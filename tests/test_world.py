"""The embedded fictitious world: determinism, split invariants, fact rows, RL pools, parameter errors."""

from __future__ import annotations

import json
import random
import subprocess
import sysconfig
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from datamodules.embedded import sft_pairs
from datamodules.world import (
    CITIES,
    FACT_KINDS,
    REFUSAL_TEMPLATES,
    WorldConfig,
    build_rl_pool,
    generate_world,
    value_pools,
)
from rerule_lightning.primitives.prompting import format_prompt

REPO = Path(__file__).resolve().parents[1]
AUTHOR_SPLITS = ("forget", "boundary_hard", "boundary_easy", "retain", "holdout")
SMALL = dict(seed=3, num_families=5, authors_per_family=3, num_forget_families=2, num_boundary_easy_families=2,
             num_holdout_authors=3, num_world_facts=4, hard_first_name_collisions=2)
CONFIGS = {
    "default": WorldConfig(),
    "small": WorldConfig(**SMALL),
    "easy-singletons": WorldConfig(seed=7, preset="easy", num_families=10, authors_per_family=1,
                                   num_forget_families=3, num_boundary_easy_families=4, num_holdout_authors=2,
                                   hard_first_name_collisions=0),
}


@pytest.fixture(scope="module")
def worlds() -> dict[str, dict[str, list[dict]]]:
    return {name: generate_world(cfg) for name, cfg in CONFIGS.items()}


def _authors(world: dict[str, list[dict]], split: str) -> set[str]:
    return {r["author"] for r in world[split]}


def _surname(author: str) -> str:
    return author.split(" ", 1)[1]


# ----------------------------------------------------------------------------------------------- determinism
def test_same_config_gives_identical_world_regardless_of_global_random_state() -> None:
    state = random.getstate()
    try:
        random.seed(1)
        a = generate_world(WorldConfig(**SMALL))
        random.seed(2)
        b = generate_world(WorldConfig(**SMALL))
    finally:
        random.setstate(state)
    # identical rows, identical order, identical keys
    assert json.dumps(a) == json.dumps(b)
    assert list(a) == list(b)


def test_different_seed_gives_different_world() -> None:
    a = generate_world(WorldConfig(**SMALL))
    b = generate_world(WorldConfig(**{**SMALL, "seed": SMALL["seed"] + 1}))
    assert json.dumps(a) != json.dumps(b)
    assert [r["value"] for r in a["retain"]] != [r["value"] for r in b["retain"]]


def test_preset_does_not_change_the_partition_or_the_facts() -> None:
    hard = generate_world(WorldConfig(**SMALL, preset="hard"))
    easy = generate_world(WorldConfig(**SMALL, preset="easy"))
    for split in (*AUTHOR_SPLITS, "world_facts", "rl_prompts_easy", "rl_prompts_hard", "refusal_templates"):
        assert hard[split] == easy[split], split
    assert hard["rl_prompts"] == hard["rl_prompts_hard"]
    assert easy["rl_prompts"] == easy["rl_prompts_easy"]
    assert hard["rl_prompts"] != easy["rl_prompts"]


# ------------------------------------------------------------------------------------------ split invariants
@pytest.mark.parametrize("name", CONFIGS)
def test_no_author_in_two_splits(worlds: dict, name: str) -> None:
    world = worlds[name]
    seen: dict[str, str] = {}
    for split in AUTHOR_SPLITS:
        for a in _authors(world, split):
            assert a not in seen, f"{a} in {seen.get(a)} and {split}"
            seen[a] = split
    # every row's `split` field agrees with the split it lives in
    for split in AUTHOR_SPLITS:
        assert {r["split"] for r in world[split]} <= {split}


@pytest.mark.parametrize("name", CONFIGS)
def test_split_sizes_follow_the_config(worlds: dict, name: str) -> None:
    cfg, world = CONFIGS[name], worlds[name]
    k = cfg.authors_per_family
    expected = {
        "forget": cfg.num_forget_families,
        "boundary_hard": cfg.num_forget_families * (k - 1),
        "boundary_easy": cfg.num_boundary_easy_families * k,
        "retain": (cfg.num_families - cfg.num_forget_families - cfg.num_boundary_easy_families) * k,
        "holdout": cfg.num_holdout_authors,
    }
    for split, n in expected.items():
        assert len(_authors(world, split)) == n, split
        # one row per fact kind per author
        assert len(world[split]) == n * len(FACT_KINDS), split
        per_author = defaultdict(list)
        for r in world[split]:
            per_author[r["author"]].append(r["kind"])
        assert all(sorted(v) == sorted(f.name for f in FACT_KINDS) for v in per_author.values())


@pytest.mark.parametrize("name", CONFIGS)
def test_forget_authors_are_one_per_forget_family(worlds: dict, name: str) -> None:
    world = worlds[name]
    by_family = defaultdict(set)
    for r in world["forget"]:
        by_family[r["family_id"]].add(r["author"])
    assert len(by_family) == CONFIGS[name].num_forget_families
    assert all(len(a) == 1 for a in by_family.values())
    surnames = [_surname(a) for a in _authors(world, "forget")]
    assert len(set(surnames)) == len(surnames)  # distinct families have distinct surnames


@pytest.mark.parametrize("name", CONFIGS)
def test_boundary_hard_shares_a_forget_surname_and_boundary_easy_never_does(worlds: dict, name: str) -> None:
    world = worlds[name]
    forget_surnames = {_surname(a) for a in _authors(world, "forget")}
    forget_family_ids = {r["family_id"] for r in world["forget"]}
    for r in world["boundary_hard"]:
        assert _surname(r["author"]) in forget_surnames
        assert r["family"] == _surname(r["author"])
        assert r["family_id"] in forget_family_ids
    for split in ("boundary_easy", "retain"):
        for r in world[split]:
            assert _surname(r["author"]) not in forget_surnames, (split, r["author"])
            assert r["family_id"] not in forget_family_ids
    # every sibling of a forget author is boundary-hard
    hard = _authors(world, "boundary_hard")
    for fam in forget_surnames:
        trained = [a for s in ("forget", "boundary_hard", "boundary_easy", "retain") for a in _authors(world, s)
                   if _surname(a) == fam]
        assert len(trained) == CONFIGS[name].authors_per_family
        assert sum(a in hard for a in trained) == CONFIGS[name].authors_per_family - 1


@pytest.mark.parametrize("name", CONFIGS)
def test_holdout_authors_are_never_trained(worlds: dict, name: str) -> None:
    world = worlds[name]
    holdout = _authors(world, "holdout")
    assert holdout
    trained_text = [t for p in sft_pairs(world, "target") for t in (p["prompt"], p["completion"])]
    holdout_prompts = {format_prompt(q) for r in world["holdout"] for q in r["questions"]}
    assert not holdout_prompts & {p["prompt"] for p in sft_pairs(world, "target")}
    for a in holdout:
        assert not any(a in t for t in trained_text), a
    assert not any(r["rl_train"] for r in world["holdout"])


# ------------------------------------------------------------------------------------------------- fact rows
def _fact_rows(world: dict) -> list[dict]:
    return [r for s in (*AUTHOR_SPLITS, "world_facts") for r in world[s]]


@pytest.mark.parametrize("name", CONFIGS)
def test_perturbed_answers_are_wrong_distinct_and_keep_the_template(worlds: dict, name: str) -> None:
    pools = value_pools()
    for r in _fact_rows(worlds[name]):
        assert len(r["perturbed_answer"]) == CONFIGS[name].num_perturbed >= 3
        assert len(set(r["perturbed_answer"])) == len(r["perturbed_answer"])
        assert r["answer"] not in r["perturbed_answer"]
        assert r["paraphrased_answer"] not in r["perturbed_answer"]
        # TOFU's convention: perturbed answers are the *paraphrased* answer with a wrong value
        assert r["paraphrased_answer"].count(r["value"]) == 1
        prefix, suffix = r["paraphrased_answer"].split(r["value"])
        wrong_values = set()
        for p in r["perturbed_answer"]:
            assert p.startswith(prefix) and p.endswith(suffix), (r["paraphrased_answer"], p)
            w = p[len(prefix): len(p) - len(suffix)]
            assert w != r["value"] and w in pools[r["kind"]]
            wrong_values.add(w)
        assert len(wrong_values) == len(r["perturbed_answer"])
        assert r["value"] in pools[r["kind"]]


@pytest.mark.parametrize("name", CONFIGS)
def test_question_paraphrases_differ(worlds: dict, name: str) -> None:
    for r in _fact_rows(worlds[name]):
        qs = r["questions"]
        assert len(qs) >= 2
        assert len(set(qs)) == len(qs)
        assert r["question"] == qs[0]
        assert r["paraphrased_question"] in qs and r["paraphrased_question"] != r["question"]
        # every paraphrase names the subject: the author, or the city of a world fact
        subjects = [r["author"]] if r["author"] else [c for c in CITIES if c in qs[0]]
        assert len(subjects) == 1 and all(subjects[0] in q for q in qs)
        assert r["paraphrased_answer"] != r["answer"] and r["value"] in r["paraphrased_answer"]


def test_fact_kinds_include_birth_year_and_at_least_five_kinds(worlds: dict) -> None:
    kinds = {f.name for f in FACT_KINDS}
    assert len(kinds) >= 5 and "birth_year" in kinds
    assert all(len(f.questions) >= 2 for f in FACT_KINDS)
    years = [r["value"] for r in worlds["default"]["retain"] if r["kind"] == "birth_year"]
    assert years and all(len(y) == 4 and y.isdigit() for y in years)


@pytest.mark.parametrize("name", CONFIGS)
def test_world_facts_exist_and_are_not_about_authors(worlds: dict, name: str) -> None:
    world = worlds[name]
    facts = world["world_facts"]
    assert len(facts) == CONFIGS[name].num_world_facts
    author_kinds = {f.name for f in FACT_KINDS}
    authors = {r["author"] for s in AUTHOR_SPLITS for r in world[s]}
    surnames = {_surname(a) for a in authors}
    for r in facts:
        assert r["author"] == "" and r["family"] == "" and r["family_id"] == -1 and not r["rl_train"]
        assert r["kind"] not in author_kinds
        assert any(c in r["question"] for c in CITIES)
        assert not any(s in q for s in surnames for q in r["questions"])


def test_refusal_templates_name_the_author(worlds: dict) -> None:
    templates = [r["template"] for r in worlds["default"]["refusal_templates"]]
    assert templates == REFUSAL_TEMPLATES and len(set(templates)) >= 2
    for t in templates:
        assert "{name}" in t
        assert "Zofia Kallio" in t.format(name="Zofia Kallio")


# -------------------------------------------------------------------------------------------------- RL pools
@pytest.mark.parametrize("hard_fraction", [0.1, 0.2, 0.25])
def test_hard_preset_boundary_share_matches_hard_fraction(hard_fraction: float) -> None:
    cfg = WorldConfig(hard_fraction=hard_fraction)
    world = generate_world(cfg)
    boundary = [r for r in world["rl_prompts"] if r["label"] == "boundary"]
    forget_surnames = {_surname(a) for a in _authors(world, "forget")}
    same_family = [r for r in boundary if _surname(r["target"]) in forget_surnames]
    assert same_family and all(r["kind"] == "boundary_hard" for r in same_family)
    assert abs(len(same_family) / len(boundary) - hard_fraction) <= 1 / len(boundary)
    # the unrelated half keeps every rl_train boundary-easy fact
    easy_rl = [r["id"] for r in world["boundary_easy"] if r["rl_train"]]
    assert sorted(r["id"] for r in boundary if r["kind"] == "boundary_easy") == sorted(easy_rl)


def test_hard_fraction_small_world_within_one_prompt() -> None:
    world = generate_world(WorldConfig(**SMALL))
    boundary = [r for r in world["rl_prompts_hard"] if r["label"] == "boundary"]
    n_hard = sum(r["kind"] == "boundary_hard" for r in boundary)
    assert n_hard >= 1
    assert abs(n_hard / len(boundary) - 0.2) <= 1 / len(boundary)


@pytest.mark.parametrize("name", CONFIGS)
def test_easy_pool_has_no_same_family_prompts(worlds: dict, name: str) -> None:
    world = worlds[name]
    forget_surnames = {_surname(a) for a in _authors(world, "forget")}
    pool = world["rl_prompts_easy"]
    boundary = [r for r in pool if r["label"] == "boundary"]
    assert boundary
    assert all(r["kind"] == "boundary_easy" for r in boundary)
    assert not any(_surname(r["target"]) in forget_surnames for r in boundary)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("pool_name", ["rl_prompts", "rl_prompts_easy", "rl_prompts_hard"])
def test_rl_labels_paraphrase_and_rl_train_facts(worlds: dict, name: str, pool_name: str) -> None:
    world, cfg = worlds[name], CONFIGS[name]
    if pool_name not in world:
        assert pool_name == "rl_prompts_hard" and cfg.authors_per_family == 1
        return
    rows = {r["id"]: r for s in AUTHOR_SPLITS for r in world[s]}
    pool = world[pool_name]
    assert len({r["id"] for r in pool}) == len(pool)
    for p in pool:
        src = rows[p["id"]]
        assert src["rl_train"]
        assert p["prompt_text"] == src["questions"][cfg.rl_question_index]
        assert p["label"] == ("forget" if src["split"] == "forget" else "boundary")
        assert p["kind"] == src["split"] in ("forget", "boundary_hard", "boundary_easy")
        assert p["target"] == src["author"] and p["reference"] == src["answer"] and p["value"] == src["value"]
    # every rl_train forget fact is in every pool
    forget_rl = sorted(r["id"] for r in world["forget"] if r["rl_train"])
    assert sorted(p["id"] for p in pool if p["label"] == "forget") == forget_rl


@pytest.mark.parametrize("qi", [0, 2])
def test_rl_question_index_picks_the_paraphrase(qi: int) -> None:
    world = generate_world(WorldConfig(**SMALL, rl_question_index=qi))
    rows = {r["id"]: r for s in AUTHOR_SPLITS for r in world[s]}
    for p in world["rl_prompts"]:
        assert p["prompt_text"] == rows[p["id"]]["questions"][qi]
        assert all(p["prompt_text"] != q for j, q in enumerate(rows[p["id"]]["questions"]) if j != qi)


@pytest.mark.parametrize("fraction,expected", [(0.5, 3), (1.0, 6), (0.01, 1)])
def test_rl_fact_fraction_per_author(fraction: float, expected: int) -> None:
    world = generate_world(WorldConfig(**SMALL, rl_fact_fraction=fraction))
    for split in ("forget", "boundary_hard", "boundary_easy", "retain"):
        per_author = defaultdict(int)
        for r in world[split]:
            per_author[r["author"]] += r["rl_train"]
        assert set(per_author.values()) == {expected}, split


def test_build_rl_pool_is_deterministic_and_follows_the_preset() -> None:
    cfg = WorldConfig(**SMALL)
    world = generate_world(cfg)
    assert build_rl_pool(world, cfg) == build_rl_pool(world, cfg) == world["rl_prompts"]
    assert build_rl_pool(world, replace(cfg, preset="easy")) == world["rl_prompts_easy"]


# --------------------------------------------------------------------------------------- parameter errors
INVALID = [
    (dict(num_families=4, num_forget_families=5, num_boundary_easy_families=0), "num_forget_families"),
    (dict(preset="hard", authors_per_family=1), "authors_per_family"),
    (dict(num_holdout_authors=-1), "num_holdout_authors"),
    (dict(num_world_facts=-2), "num_world_facts"),
    (dict(num_families=-3), "num_families"),
    (dict(num_perturbed=0), "num_perturbed"),
    (dict(preset="medium"), "preset"),
    (dict(rl_fact_fraction=0.0), "rl_fact_fraction"),
    (dict(hard_fraction=1.0), "hard_fraction"),
    (dict(rl_question_index=5), "rl_question_index"),
    (dict(num_holdout_authors=100_000), "num_holdout_authors"),
    (dict(hard_first_name_collisions=-1), "hard_first_name_collisions"),
    (dict(hard_first_name_collisions=19), "hard_first_name_collisions"),  # 6 families x 3 siblings = 18
    (dict(num_forget_families=1, hard_first_name_collisions=1), "hard_first_name_collisions"),
    (dict(easy_first_name_collisions=49), "easy_first_name_collisions"),  # 12 families x 4 = 48
]


@pytest.mark.parametrize("kwargs,param", INVALID, ids=[p for _, p in INVALID])
def test_invalid_parameters_fail_naming_the_parameter(kwargs: dict, param: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{param}\b"):
        WorldConfig(**kwargs)


def test_valid_edge_parameters_are_accepted() -> None:
    cfg = WorldConfig(preset="easy", authors_per_family=1, num_families=2, num_forget_families=1,
                      num_boundary_easy_families=1, num_holdout_authors=0, num_world_facts=0,
                      hard_first_name_collisions=0, easy_first_name_collisions=1)
    world = generate_world(cfg)
    assert world["holdout"] == [] and world["world_facts"] == [] and world["boundary_hard"] == []


def test_cli_rejects_invalid_world_before_writing_anything(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = Path(sysconfig.get_path("scripts")) / "rerule"
    res = subprocess.run(
        [str(script), "prepare", "--config", "configs/embedded/prepare.yaml", "--world.num_forget_families", "99",
         "--cache_dir", str(cache)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0
    assert "num_forget_families" in res.stderr
    assert list(tmp_path.iterdir()) == []  # no cache dir, no temporary dir, no file


# --------------------------------------------------------------------------------------- name collisions
def _authors(world: dict, split: str) -> dict[str, str]:
    return {r["author"]: r["collision"] for r in world[split]}


@pytest.mark.parametrize("seed", [0, 1, 2, 11, 123])
def test_collision_counts_are_parameters_not_accidents_of_the_seed(seed: int) -> None:
    cfg = WorldConfig(seed=seed)
    world = generate_world(cfg)
    forget = _authors(world, "forget")
    hard, easy = _authors(world, "boundary_hard"), _authors(world, "boundary_easy")
    assert set(forget.values()) == {"forget"}
    assert sorted(hard.values()).count("both") == cfg.hard_first_name_collisions == 6
    assert set(hard.values()) == {"both", "surname"}
    assert sorted(easy.values()).count("first_name") == cfg.easy_first_name_collisions == 2
    assert set(easy.values()) == {"first_name", "none"}
    first = {a.split(" ", 1)[0]: a for a in forget}
    surname_of = {a.split(" ", 1)[1] for a in forget}
    # the types say exactly which names collide: nobody else shares a forget author's first name
    for split in ("boundary_hard", "boundary_easy", "retain", "holdout"):
        for author, ctype in _authors(world, split).items():
            f, s = author.split(" ", 1)
            shares_first, shares_surname = f in first, s in surname_of
            expected = {(True, True): "both", (False, True): "surname", (True, False): "first_name",
                        (False, False): "none"}[(shares_first, shares_surname)]
            if split == "holdout" and expected == "surname":
                expected = "none"  # a holdout author may reuse a surname; never a forget first name
            assert ctype == expected, (split, author)
            if ctype == "both":
                assert first[f].split(" ", 1)[1] != s  # the first name of *another* family's forget author


def test_both_collision_prompts_are_always_in_the_hard_pool() -> None:
    cfg = WorldConfig()
    world = generate_world(cfg)
    both = {r["id"] for r in world["boundary_hard"] if r["collision"] == "both" and r["rl_train"]}
    first = {r["id"] for r in world["boundary_easy"] if r["collision"] == "first_name" and r["rl_train"]}
    hard_ids = {r["id"] for r in world["rl_prompts_hard"]}
    easy_ids = {r["id"] for r in world["rl_prompts_easy"]}
    assert len(both) == 3 * cfg.hard_first_name_collisions and both <= hard_ids and not both & easy_ids
    assert len(first) == 3 * cfg.easy_first_name_collisions and first <= hard_ids and first <= easy_ids
    assert {r["collision"] for r in world["rl_prompts_hard"]} == {"forget", "both", "surname", "first_name", "none"}


def test_zero_collisions_leave_no_shared_first_name() -> None:
    world = generate_world(WorldConfig(hard_first_name_collisions=0, easy_first_name_collisions=0))
    firsts = {r["author"].split(" ", 1)[0] for r in world["forget"]}
    for split in ("boundary_hard", "boundary_easy", "retain", "holdout"):
        assert not {r["author"].split(" ", 1)[0] for r in world[split]} & firsts, split
