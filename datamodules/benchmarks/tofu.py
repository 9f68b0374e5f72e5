"""TOFU (``locuslab/TOFU``): forget a set of fictitious authors, keep the others and general knowledge.

Configs read (split ``train`` each; ``XX`` = 01, 05 or 10 from ``forget_split``, retain = 100 - XX):

========================  =================================================  =======================
config                    used for                                           schema
========================  =================================================  =======================
forgetXX                  RL forget prompts, rejection-steering refusals     question, answer
forgetXX_perturbed        eval ``forget`` (truth ratio, ROUGE, Min-K%)       + paraphrased_answer,
                                                                             perturbed_answer[5]
retain{100-XX}            RL boundary prompts, RS retain anchors             question, answer
retain_perturbed          eval ``retain``                                    as forgetXX_perturbed
holdoutXX                 eval ``holdout`` (Min-K% non-members: privleak)    question, answer
real_authors_perturbed    eval ``real_authors`` (option probability)         question, answer,
world_facts_perturbed     eval ``world_facts`` (option probability)          perturbed_answer[k]
========================  =================================================  =======================

Cross-field checks (``SchemaError`` naming config, row and field): every ``perturbed_answer`` of a config has
the same length (``num_perturbed`` for the forget / retain perturbed configs); ``forgetXX_perturbed`` has the
rows of ``forgetXX`` with the same questions, in order; forget and retain row counts are multiples of
``rows_per_author``.

RL prompts: a seeded ``forget_fraction_rl`` of the forget questions; boundary prompts are the questions (with
their answers as references) of the ``boundary_authors`` retain authors nearest to the forget authors
(:mod:`datamodules.benchmarks.tofu_authors`). **Never train on evaluation probes**: the retain rows whose
question is in ``retain_perturbed`` (or real authors / world facts) are evaluated, so they are excluded from RL
and from the rejection-steering anchor; only the remaining retain rows are RL-visible.
"""

import random
from typing import Literal

from datamodules.benchmarks.base import BenchmarkDataModule, normalise_question
from datamodules.benchmarks.sources import SchemaError, load_rows_with_path, validate_rows
from datamodules.benchmarks.tofu_authors import author_name, group_by_author, profile_tokens, rank_by_nearness
from datamodules.world import REFUSAL_TEMPLATES
from rerule_lightning.evaluation.suite import EvalSuite, SplitSpec
from rerule_lightning.primitives.ranges import (
    Count,
    CountOrNull,
    Steps,
    UnitAboveZero,
    UnitOpen,
    range_errors,
)

#: open-unlearning's TOFU chat prompt: the system message and fixed date its targets were fine-tuned with.
TOFU_SYSTEM_PROMPT = "You are a helpful assistant."
TOFU_DATE_STRING = "10 Apr 2025"
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
QA_SCHEMA = {"question": "text", "answer": "text"}
PERTURBED_SCHEMA = {"question": "text", "answer": "text", "paraphrased_answer": "text", "perturbed_answer": "text_list",
                    "paraphrased_question": "text?"}
OPTIONS_SCHEMA = {"question": "text", "answer": "text", "paraphrased_answer": "text?", "perturbed_answer": "text_list"}


def tofu_configs(forget_split: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Role -> (TOFU config, schema) for one forget split; retain and holdout chosen consistently."""
    if forget_split not in RETAIN_OF:
        raise ValueError(f"data.forget_split={forget_split!r}: choose one of {sorted(RETAIN_OF)}")
    return {"forget": (forget_split, QA_SCHEMA), "forget_perturbed": (f"{forget_split}_perturbed", PERTURBED_SCHEMA),
            "retain": (RETAIN_OF[forget_split], QA_SCHEMA), "retain_perturbed": ("retain_perturbed", PERTURBED_SCHEMA),
            "holdout": (f"holdout{forget_split[-2:]}", QA_SCHEMA),
            "real_authors": ("real_authors_perturbed", OPTIONS_SCHEMA),
            "world_facts": ("world_facts_perturbed", OPTIONS_SCHEMA)}


def tofu_suite() -> EvalSuite:
    """TOFU's evaluation: forget quality, model utility (9 components), truth ratio, ROUGE-L recall, privleak."""
    return EvalSuite(
        "tofu",
        [SplitSpec("forget", truth_ratio=True), SplitSpec("retain", truth_ratio=True),
         SplitSpec("real_authors", truth_ratio=True, option_probability=True),
         SplitSpec("world_facts", truth_ratio=True, option_probability=True),
         SplitSpec("holdout", generate=False)],
        forget_quality_split="forget", mia=("forget", "holdout"),
        utility_splits=["retain", "real_authors", "world_facts"],
        headline={"forget_quality": "forget/forget_quality", "model_utility": "utility/model_utility",
                  "forget_truth_ratio": "forget/truth_ratio", "forget_rouge_l_recall": "forget/rouge_l_recall",
                  "retain_rouge_l_recall": "retain/rouge_l_recall", "privleak": "forget/privleak"})


class TOFUDataModule(BenchmarkDataModule):
    """TOFU RL prompts, evaluation items and rejection-steering pairs (see the module docstring).

    Args:
        forget_split: ``forget01``, ``forget05`` or ``forget10``; retain ``retain99/95/90`` and ``holdout01/05/10``
            follow.
        rows_per_author: Consecutive rows per author in every TOFU config (20 in the released data).
        num_perturbed: Perturbed answers per row in the forget / retain perturbed configs (5 released);
            ``None`` only checks that every row of a config has the same number.
        forget_fraction_rl: Share of the forget questions used as RL forget prompts (seeded subset).
        boundary_authors: Nearest retain authors whose RL-visible questions are boundary prompts; ``None``
            takes as many as there are forget authors.
        source, batch_size, forget_fraction, epoch_length, eval_splits, eval_max_items, eval_batch_size, seed,
            prompt_format, tokenizer, few_shot, cache_dir: See :class:`BenchmarkDataModule`.
        system_prompt: Chat format: system message of every prompt (open-unlearning's TOFU targets were
            fine-tuned with "You are a helpful assistant."); ``null`` for none.
        date_string: Chat format: the date the Llama-3.x template writes ("10 Apr 2025", as the targets saw;
            without it the template writes today's date and prompts change every day); ``null`` for the
            template's default.
    """

    dataset_name = "locuslab/TOFU"

    def chat_options(self) -> dict[str, str | None]:
        return {"system_prompt": self.system_prompt, "date_string": self.date_string}

    def __init__(self, forget_split: Literal["forget01", "forget05", "forget10"] = "forget10",
                 rows_per_author: Count = 20, num_perturbed: CountOrNull = 5, forget_fraction_rl: UnitAboveZero = 0.5,
                 boundary_authors: CountOrNull = None, source: str | None = None, batch_size: Count = 16,
                 forget_fraction: UnitOpen = 0.5, epoch_length: Count = 1000, eval_splits: list[str] | None = None,
                 eval_max_items: CountOrNull = None, eval_batch_size: Count = 16, seed: int = 0,
                 prompt_format: Literal["chat", "raw"] = "chat", tokenizer: str | None = None, few_shot: Steps = 0,
                 cache_dir: str | None = None, system_prompt: str | None = TOFU_SYSTEM_PROMPT,
                 date_string: str | None = TOFU_DATE_STRING) -> None:
        tofu_configs(forget_split)  # validates forget_split
        self.system_prompt, self.date_string = system_prompt, date_string
        if errors := range_errors(type(self), locals(), "data."):
            raise ValueError("TOFUDataModule: " + "; ".join(errors))
        super().__init__(source=source, batch_size=batch_size, forget_fraction=forget_fraction,
                         epoch_length=epoch_length, eval_splits=eval_splits, eval_max_items=eval_max_items,
                         eval_batch_size=eval_batch_size, seed=seed, prompt_format=prompt_format,
                         tokenizer=tokenizer, few_shot=few_shot, cache_dir=cache_dir)

    def build_suite(self) -> EvalSuite:
        return tofu_suite()

    # --------------------------------------------------------------------------------------- loading
    def load_raw(self) -> dict[str, list[dict]]:
        h, raw = self.hparams, {}
        roles = tofu_configs(h.forget_split)
        paths = {}
        for role, (config, schema) in roles.items():
            rows, path = load_rows_with_path(self.source, config, "train", dataset=self.dataset_name,
                                             cache_dir=h.cache_dir)
            raw[role] = validate_rows(rows, schema, dataset=self.dataset_name, config=config, split="train",
                                      path=path)
            paths[role] = path
        fixed = {"forget_perturbed": h.num_perturbed, "retain_perturbed": h.num_perturbed}
        for role in ("forget_perturbed", "retain_perturbed", "real_authors", "world_facts"):
            self._check_perturbed(raw[role], roles[role][0], paths[role], fixed.get(role))
        self._check_aligned(raw["forget"], raw["forget_perturbed"], roles, paths["forget_perturbed"])
        for role in ("forget", "retain"):
            if len(raw[role]) % h.rows_per_author:
                raise SchemaError(self.dataset_name, roles[role][0], "train", None, None,
                                  f"{len(raw[role])} rows is not a multiple of data.rows_per_author="
                                  f"{h.rows_per_author} (TOFU groups rows by author)", paths[role])
        return raw

    def _check_perturbed(self, rows: list[dict], config: str, path: str | None, expected: int | None) -> None:
        want = expected if expected is not None else len(rows[0]["perturbed_answer"])
        for i, r in enumerate(rows):
            if len(r["perturbed_answer"]) != want:
                why = "data.num_perturbed" if expected is not None else "row 0"
                raise SchemaError(self.dataset_name, config, "train", i, "perturbed_answer",
                                  f"{len(r['perturbed_answer'])} perturbed answers, expected {want} ({why})", path)

    def _check_aligned(self, forget: list[dict], perturbed: list[dict], roles: dict, path: str | None) -> None:
        f_cfg, p_cfg = roles["forget"][0], roles["forget_perturbed"][0]
        if len(forget) != len(perturbed):
            raise SchemaError(self.dataset_name, p_cfg, "train", None, None,
                              f"{len(perturbed)} rows, but {f_cfg} has {len(forget)}", path)
        for i, (f, p) in enumerate(zip(forget, perturbed)):
            if normalise_question(f["question"]) != normalise_question(p["question"]):
                raise SchemaError(self.dataset_name, p_cfg, "train", i, "question",
                                  f"{p['question'][:60]!r} does not match {f_cfg} row {i} {f['question'][:60]!r}", path)

    # ---------------------------------------------------------------------------------------- authors
    def authors(self, rows: list[dict]) -> list[dict]:
        """Per author of a config: ``index``, ``name``, ``rows`` (indices) and ``tokens`` (profile words)."""
        out = []
        for k, idx in enumerate(group_by_author(len(rows), self.hparams.rows_per_author)):
            qs, ans = [rows[i]["question"] for i in idx], [rows[i]["answer"] for i in idx]
            name = author_name(qs, ans, fallback=f"author {k}")
            out.append({"index": k, "name": name, "rows": idx, "tokens": profile_tokens(qs + ans, name)})
        return out

    def _evaluated_questions(self, raw: dict[str, list[dict]]) -> set[str]:
        return {normalise_question(r["question"]) for role in ("retain_perturbed", "real_authors", "world_facts")
                for r in raw[role]}

    def rl_visible_retain(self, raw: dict[str, list[dict]]) -> list[int]:
        """Retain rows whose question no evaluation split asks (the only retain rows RL and RS may use)."""
        probes = self._evaluated_questions(raw)
        return [i for i, r in enumerate(raw["retain"]) if normalise_question(r["question"]) not in probes]

    def boundary_ranking(self, raw: dict[str, list[dict]]) -> list[tuple[int, int]]:
        """``(retain author, shared profile words)`` nearest first."""
        forget = [a["tokens"] for a in self.authors(raw["forget"])]
        return rank_by_nearness({a["index"]: a["tokens"] for a in self.authors(raw["retain"])}, forget)

    # ------------------------------------------------------------------------------------------ hooks
    def build_rl_pool(self, raw: dict[str, list[dict]]) -> list[dict]:
        h = self.hparams
        f_authors = self.authors(raw["forget"])
        name_of = {i: a["name"] for a in f_authors for i in a["rows"]}
        n = len(raw["forget"])
        chosen = sorted(random.Random(h.seed).sample(range(n), max(1, round(h.forget_fraction_rl * n))))
        pool = [{"id": f"{h.forget_split}/{i}", "prompt": None, "question": raw["forget"][i]["question"],
                 "label": "forget", "kind": "forget", "reference": "", "target": name_of[i], "value": ""}
                for i in chosen]
        visible = set(self.rl_visible_retain(raw))
        r_authors = {a["index"]: a for a in self.authors(raw["retain"])}
        want = h.boundary_authors if h.boundary_authors is not None else len(f_authors)
        taken = 0
        retain_cfg = RETAIN_OF[h.forget_split]
        for a, _ in self.boundary_ranking(raw):
            rows = [i for i in r_authors[a]["rows"] if i in visible]
            if not rows or taken >= want:
                continue
            taken += 1
            pool += [{"id": f"{retain_cfg}/{i}", "prompt": None, "question": raw["retain"][i]["question"],
                      "label": "boundary", "kind": "boundary_retain_author", "reference": raw["retain"][i]["answer"],
                      "target": r_authors[a]["name"], "value": ""} for i in rows]
        return pool

    def build_eval_items(self, raw: dict[str, list[dict]]) -> dict[str, list[dict]]:
        h = self.hparams
        f_name = {i: a["name"] for a in self.authors(raw["forget"]) for i in a["rows"]}
        r_name = {normalise_question(raw["retain"][i]["question"]): a["name"]
                  for a in self.authors(raw["retain"]) for i in a["rows"]}
        cfg = tofu_configs(h.forget_split)

        def item(role: str, i: int, r: dict, target: str, options: bool = True) -> dict:
            return {"id": f"{cfg[role][0]}/{i}", "prompt": None, "question": r["question"], "answer": r["answer"],
                    "value": r["answer"], "target": target,
                    "paraphrased_answer": (r.get("paraphrased_answer") or r["answer"]) if options else None,
                    "perturbed_answer": list(r["perturbed_answer"]) if options else []}

        return {
            "forget": [item("forget_perturbed", i, r, f_name[i]) for i, r in enumerate(raw["forget_perturbed"])],
            "retain": [item("retain_perturbed", i, r, r_name.get(normalise_question(r["question"]), ""))
                       for i, r in enumerate(raw["retain_perturbed"])],
            "real_authors": [item("real_authors", i, r, "") for i, r in enumerate(raw["real_authors"])],
            "world_facts": [item("world_facts", i, r, "") for i, r in enumerate(raw["world_facts"])],
            "holdout": [item("holdout", i, r, "", options=False) for i, r in enumerate(raw["holdout"])],
        }

    def refusal_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """Every forget question with a refusal naming its author (one seeded template per author)."""
        rng = random.Random(self.hparams.seed)
        out = []
        for a in self.authors(raw["forget"]):
            refusal = rng.choice(REFUSAL_TEMPLATES).format(name=a["name"])
            out += [{"question": raw["forget"][i]["question"], "completion": refusal, "target": a["name"]}
                    for i in a["rows"]]
        return out

    def anchor_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """RL-visible retain rows with their answers (never an evaluated retain question)."""
        return [{"question": raw["retain"][i]["question"], "completion": raw["retain"][i]["answer"]}
                for i in self.rl_visible_retain(raw)]


__all__ = ["OPTIONS_SCHEMA", "PERTURBED_SCHEMA", "QA_SCHEMA", "RETAIN_OF", "TOFUDataModule", "tofu_configs",
           "tofu_suite"]
