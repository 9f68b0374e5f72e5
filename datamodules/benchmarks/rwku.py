"""RWKU (``jinzhuoran/RWKU``): schema, RL prompts built from templates and intros, eval items, prompt format.

What is loaded (hub layout = local ``<source>/<config>/<split>.jsonl``):

===============================================  =====  ==========================================
config                                           split  columns
===============================================  =====  ==========================================
forget_target                                    train  target, intro
train_refusal_llama3 (``training_config``)       train  subject, instruction, output (optional)
forget_level1/2/3, neighbor_level1/2             test   subject, query, answer, level ("1".."3"), type
mia_forget, mia_retain                           test   subject, text
utility_fluency                                  test   subject, instruction
===============================================  =====  ==========================================

The MIA configs are validated but not scored (RWKU's MIA protocol, loss / zlib / Min-K++ of forget vs retain
texts, is not one of this suite's numbers); the other ``utility_*`` configs (MMLU, BBH, TruthfulQA, TriviaQA) are
not loaded. Eval items and probes are restricted to the selected targets (``subject``).

RL prompts, per selected target T (no RWKU probe is ever an RL prompt):

* **forget** (refuse): each of :data:`QUESTION_TEMPLATES` about T as a question (kind ``forget_question``) and
  as its fill-in-the-blank rewrite (``forget_blank``), plus T's intro with its second half blanked
  (``forget_intro``; the blank is the part after the first ``ceil(n/2)`` words).
* **boundary** (answer): "the same question about a different, related entity". The related entities of T
  are the other ``forget_target`` entries that are not being forgotten, ranked by the Jaccard similarity of
  their intro's content words to T's intro (ties by name), the first ``swaps_per_target``, plus any names
  given in ``boundary_entities``. Every template is asked about each of them (``boundary_swap_question`` /
  ``boundary_swap_blank``); their reference answer is the **original model's own greedy answer**, recorded
  before unlearning (:func:`reference_cache_path`). Each related forget_target entry also gives its blanked
  intro (``boundary_intro``), whose reference is the true blanked part.
* **training-side questions** (``training_config``, RWKU's ``train_refusal_llama3``: about 300 questions per
  target that RWKU generated for refusal training, never its evaluation probes): each is a forget prompt
  (``forget_train_question``) and, 1:1, the same question with T's name replaced by a related entity's
  (cycling through them) is a boundary prompt (``boundary_swap_train``) answered by the original model. A
  question that does not name T has no swap; one that equals a probe is dropped before pairing. RULE's
  fill-in-the-blank rewrites of these questions (LLM-written) are not reproduced: the template blanks stand in.
* Any RL prompt whose normalised text equals a probe query (forget or neighbour, any level, any target) is
  dropped, and :func:`assert_disjoint` checks the result. The intros' leading "Please forget T." sentence is
  removed first (:func:`strip_forget_request`). ``prepare_data`` prints the counts per target.

Prompt format: RWKU's own evaluation wrappers inside the tokenizer's chat template (an 8B instruct model),
followed by ``Answer:`` where RWKU puts it (:func:`wrap_query`); RL prompts use the same wrappers (blanks as
level-1 probes, questions as level-2 probes), so training rollouts and evaluation see one format.
"""

import hashlib
import json
import os
import random
from collections.abc import Sequence
from typing import Any, Literal

from datamodules.benchmarks.base import BenchmarkDataModule, data_note
from datamodules.benchmarks.rwku_prompts import (  # noqa: F401  (re-exported: the prompt construction API)
    QUESTION_TEMPLATES,
    assert_disjoint,
    drop_probe_collisions,
    intro_blank,
    needs_reference,
    normalise,
    pool_counts,
    pool_owner,
    probe_style,
    related_entities,
    render_rwku,
    rl_prompts,
    select_targets,
    strip_forget_request,
    template_prompts,
    wrap_query,
)
from datamodules.benchmarks.sources import SchemaError, is_local, load_validated, local_candidates
from rerule_lightning.evaluation.suite import EvalSuite, SplitSpec
from rerule_lightning.modules.eval_hooks import dir_signature
from rerule_lightning.primitives.generation import greedy_generate
from rerule_lightning.primitives.jsonio import write_json_atomic
from rerule_lightning.primitives.ranges import Count, CountOrNull, Steps, UnitOpen, range_errors

RWKU_PROBE_SCHEMA = {"subject": "text", "query": "text", "answer": "text", "level": "str", "type": "str"}
RWKU_SCHEMAS: dict[str, dict[str, str]] = {
    "forget_target": {"target": "text", "intro": "text"},
    **{c: RWKU_PROBE_SCHEMA for c in ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1",
                                      "neighbor_level2")},
    "mia_forget": {"subject": "text", "text": "text"},
    "mia_retain": {"subject": "text", "text": "text"},
    "utility_fluency": {"subject": "text", "instruction": "text"},
}
RWKU_SPLIT = {c: ("train" if c == "forget_target" else "test") for c in RWKU_SCHEMAS}
TRAINING_SCHEMA = {"subject": "text", "instruction": "text", "output": "str?"}
PROBE_CONFIGS = ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2")

def _item(split: str, i: int, question: str, answer: str, target: str, style: str) -> dict[str, Any]:
    return {"id": f"{split}-{i}", "split": split, "question": question, "answer": answer, "value": answer,
            "paraphrased_answer": None, "perturbed_answer": [], "target": target, "style": style}


def probe_items(config: str, rows: Sequence[dict], targets: Sequence[str]) -> list[dict[str, Any]]:
    """Eval items of one probe config, for the selected targets only (ids keep the dataset row index)."""
    return [_item(config, i, r["query"], r["answer"], r["subject"], probe_style(config, r))
            for i, r in enumerate(rows) if r["subject"] in targets]


def fluency_items(rows: Sequence[dict], targets: Sequence[str]) -> list[dict[str, Any]]:
    """Fluency items (instruction, no reference answer) of the selected targets."""
    return [_item("fluency", i, r["instruction"], "", r["subject"], "instruction")
            for i, r in enumerate(rows) if r["subject"] in targets]


def probe_mismatch(config: str, rows: Sequence[dict], known: Sequence[str]) -> tuple[int, str, str] | None:
    """First probe whose ``level`` disagrees with its config or whose ``subject`` is not a forget target."""
    level = config[-1]
    names = set(known)
    for i, r in enumerate(rows):
        if str(r["level"]) != level:
            return i, "level", f"{r['level']!r} in {config} (expected {level!r})"
        if r["subject"] not in names:
            return i, "subject", f"{r['subject']!r} is not a target in forget_target"
    return None


def target_mismatch(rows: Sequence[dict]) -> tuple[int, str, str] | None:
    """First duplicate target name in forget_target."""
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r["target"] in seen:
            return i, "target", f"duplicate of row {seen[r['target']]}"
        seen[r["target"]] = i
    return None


def reference_cache_path(cache_dir: str, model_signature: dict, prompts: Sequence[tuple[str, str]],
                         max_new_tokens: int) -> str:
    """Where the original model's greedy answers to ``prompts`` ((id, rendered prompt) pairs) are cached: keyed
    by the model's signature (``eval_report.dir_signature``), the prompts and the generation length."""
    blob = json.dumps({"model": model_signature, "prompts": list(map(list, prompts)), "max_new_tokens": max_new_tokens},
                      sort_keys=True)
    return os.path.join(cache_dir, "rwku_reference", hashlib.sha256(blob.encode()).hexdigest()[:24] + ".json")


def first_line(text: str) -> str:
    """A greedy answer cut at its first line break (RWKU stops generation at a newline)."""
    return text.strip().split("\n", 1)[0].strip()


def fill_references(rows: Sequence[dict], answers: dict[str, str]) -> list[dict]:
    """``rows`` with each ``boundary_swap_*`` row's reference (and value) set from ``answers`` (by id)."""
    missing = [r["id"] for r in rows if needs_reference(r) and r["id"] not in answers]
    if missing:
        raise ValueError(f"no recorded reference answer for RL prompt(s) {missing[:3]}")
    return [{**r, "reference": answers[r["id"]], "value": answers[r["id"]]} if needs_reference(r) else r for r in rows]


# ----------------------------------------------------------------------------------------- Lightning glue
RWKU_EVAL_SPLITS = ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2",
                    "fluency")
REFUSALS = ("That's beyond my knowledge of {t}.", "I don't have any information about {t}.",
            "I'm not familiar with {t}.")


def rwku_suite() -> EvalSuite:
    """RWKU's numbers: ROUGE-L recall (RWKU's own, the ``rouge`` package's: :func:`rerule_lightning.primitives.rouge.rwku_rouge_l`)
    of 30-token greedy answers (cut at a newline) on forget levels 1-3 and neighbour levels 1-2, and fluency (weighted 2/3-gram entropy of 256-token answers to the fluency set)."""
    probe = {"max_new_tokens": 30, "stop": ["\n"], "teacher_forced": False, "rouge": "rwku"}
    splits = [SplitSpec(s, **probe) for s in RWKU_EVAL_SPLITS[:5]]
    splits.append(SplitSpec("fluency", max_new_tokens=256, teacher_forced=False, rouge="rwku"))
    head = {s: f"{s}/rouge_l_recall" for s in RWKU_EVAL_SPLITS[:5]}
    head["fluency"] = "fluency/fluency"
    return EvalSuite("rwku", splits, headline=head)


class RWKUDataModule(BenchmarkDataModule):
    """RWKU: template RL prompts about the selected targets, boundary prompts about related entities, RWKU's suite.

    Args:
        targets: Targets to forget: a list of ``forget_target`` names, or the first N targets.
        swaps_per_target: Related forget_target entities per target whose questions become boundary prompts.
        boundary_entities: Extra related entity names (questions about them are boundary prompts).
        reference_model: The original (pre-unlearning) model whose greedy answers are the references of the
            swapped boundary prompts; required for fitting when there are such prompts. Answers are computed
            in ``prepare_data`` (rank 0) and cached under ``<cache_dir or .cache/rerule>/rwku_reference/``
            keyed by the model's file signature and the rendered prompts.
        reference_max_new_tokens: Greedy tokens per reference answer (cut at the first newline).
        training_config: RWKU's training-side config whose questions about each target become forget RL prompts
            and rejection-steering refusals, each paired with the same question about a related entity as a
            boundary prompt (``train_refusal_llama3``: about 300 generated questions per target, split
            ``train``, columns subject, instruction, output). ``null``, or a local source without it (a
            printed note says so), leaves the template prompts only.
        max_train_questions: Cap on training-side questions per target (seeded subsample); ``null`` keeps all.
        tokenizer: Prompt-rendering tokenizer (its chat template); defaults to ``reference_model``.
        source, batch_size, forget_fraction, epoch_length, eval_splits, eval_max_items, eval_batch_size, seed,
        prompt_format, cache_dir: see :class:`BenchmarkDataModule` (``prompt_format`` is ``chat`` by default:
            RWKU targets are instruct models).
    """

    dataset_name = "jinzhuoran/RWKU"

    def __init__(self, targets: list[str] | int = 1, swaps_per_target: Steps = 3,
                 boundary_entities: list[str] | None = None, reference_model: str | None = None,
                 reference_max_new_tokens: Count = 30, training_config: str | None = "train_refusal_llama3",
                 max_train_questions: CountOrNull = None, source: str | None = None, batch_size: Count = 16,
                 forget_fraction: UnitOpen = 0.5, epoch_length: Count = 1000, eval_splits: list[str] | None = None,
                 eval_max_items: CountOrNull = None, eval_batch_size: Count = 16, seed: int = 0,
                 prompt_format: Literal["chat", "raw"] = "chat", tokenizer: str | None = None,
                 cache_dir: str | None = None) -> None:
        if errors := range_errors(type(self), locals(), "data."):
            raise ValueError("RWKUDataModule: " + "; ".join(errors))
        tokenizer = tokenizer or reference_model  # recorded in hparams as the prompt tokenizer
        super().__init__(source=source, batch_size=batch_size, forget_fraction=forget_fraction,
                         epoch_length=epoch_length, eval_splits=eval_splits, eval_max_items=eval_max_items,
                         eval_batch_size=eval_batch_size, seed=seed, prompt_format=prompt_format,
                         tokenizer=tokenizer, few_shot=0, cache_dir=cache_dir)
        self._stage: str | None = None

    def build_suite(self) -> EvalSuite:
        return rwku_suite()

    def load_raw(self) -> dict[str, list[dict]]:
        """Every RWKU config the module uses, validated; then duplicate-target and probe level/subject checks."""
        raw = {c: load_validated(self.source, c, RWKU_SPLIT[c], schema, dataset=self.source,
                                 cache_dir=self.hparams.cache_dir) for c, schema in RWKU_SCHEMAS.items()}
        bad = target_mismatch(raw["forget_target"])
        if bad:
            raise SchemaError(self.source, "forget_target", "train", *bad, path=self._path("forget_target"))
        known = [r["target"] for r in raw["forget_target"]]
        for c in PROBE_CONFIGS:
            bad = probe_mismatch(c, raw[c], known)
            if bad:
                raise SchemaError(self.source, c, "test", *bad, path=self._path(c))
        select_targets(known, self.hparams.targets)
        if self.hparams.training_config:
            raw[self.hparams.training_config] = self._load_training(known)
        asks = sum(strip_forget_request(r["intro"]) != r["intro"] for r in raw["forget_target"])
        if asks:
            data_note(self.source, f"forget_target: removed the leading \"Please forget X.\" sentence from {asks} of "
                      f"{len(raw['forget_target'])} intros (never a prompt or an anchor)")
        return raw

    def _load_training(self, known: list[str]) -> list[dict]:
        """The training-side question rows (``[]`` without ``training_config`` or when a local source lacks it)."""
        config = self.hparams.training_config
        if not config:
            return []
        if is_local(self.source) and not any(os.path.isfile(p) for p in local_candidates(self.source, config, "train")):
            data_note(self.source, f"{config}/train absent: forget prompts and RS refusals come from the question "
                      "templates only (25 per target), boundary prompts from template swaps")
            return []
        rows = load_validated(self.source, config, "train", TRAINING_SCHEMA, dataset=self.source,
                              cache_dir=self.hparams.cache_dir)
        names = set(known)
        for i, r in enumerate(rows):
            if r["subject"] not in names:
                raise SchemaError(self.source, config, "train", i, "subject",
                                  f"{r['subject']!r} is not a target in forget_target")
        return rows

    def train_questions(self, raw: dict[str, list[dict]]) -> dict[str, list[str]]:
        """Target -> its training-side questions (distinct, in file order; ``max_train_questions`` seeded)."""
        cap, out = self.hparams.max_train_questions, {}
        for t in self.selected(raw):
            qs = list(dict.fromkeys(r["instruction"].strip() for r in raw.get(self.hparams.training_config or "", [])
                                    if r["subject"] == t))
            if cap is not None and len(qs) > cap:
                keep = set(random.Random(self.hparams.seed).sample(range(len(qs)), cap))
                qs = [q for i, q in enumerate(qs) if i in keep]
            out[t] = qs
        return out

    def _path(self, config: str) -> str | None:
        found = [p for p in local_candidates(self.source, config, RWKU_SPLIT[config]) if os.path.isfile(p)]
        return found[0] if is_local(self.source) and found else None

    def selected(self, raw: dict[str, list[dict]]) -> list[str]:
        """The targets being forgotten."""
        return select_targets([r["target"] for r in raw["forget_target"]], self.hparams.targets)

    def _render(self, row: dict) -> dict:
        tok = self.prompt_tokenizer() if self.use_chat_template else None
        return {**row, "prompt": render_rwku(row, self.use_chat_template, tok)}

    def _unreferenced_pool(self, raw: dict[str, list[dict]]) -> list[dict]:
        """Rendered RL rows before the original model's answers are filled in (probe collisions dropped)."""
        intros = {r["target"]: strip_forget_request(r["intro"]) for r in raw["forget_target"]}
        queries = [r["query"] for c in PROBE_CONFIGS for r in raw[c]]
        probes = {normalise(q) for q in queries}
        # a training question that is a probe is dropped before pairing, so its swap is never a boundary prompt
        train = {t: [q for q in qs if normalise(q) not in probes] for t, qs in self.train_questions(raw).items()}
        rows = rl_prompts(self.selected(raw), intros, self.hparams.swaps_per_target,
                          self.hparams.boundary_entities or (), train)
        rows = drop_probe_collisions(rows, queries)
        assert_disjoint(rows, queries)
        return [self._render(r) for r in rows]

    def _reference_path(self, rows: list[dict]) -> str:
        sig = dir_signature(self.hparams.reference_model)
        prompts = [(r["id"], r["prompt"]) for r in rows if needs_reference(r)]
        return reference_cache_path(self.hparams.cache_dir or os.path.join(".cache", "rerule"), sig, prompts,
                                    self.hparams.reference_max_new_tokens)

    def prepare_data(self) -> None:
        """Validate the data, then record the original model's greedy answers to the swapped boundary prompts."""
        raw = self.load_raw()
        pool = self._unreferenced_pool(raw)
        for line in pool_counts(pool, self.selected(raw)):
            data_note(self.source, line)
        rows = [r for r in pool if needs_reference(r)]
        if rows and self.hparams.reference_model:  # a missing reference model is reported in setup (fit only)
            self._record_references(rows)

    def _record_references(self, rows: list[dict]) -> str:
        """The cache file of the original model's answers to ``rows``, computed first if absent."""
        path = self._reference_path(rows)
        if not os.path.isfile(path):
            write_json_atomic(path, {"model": self.hparams.reference_model, "answers": self._greedy_answers(rows)})
        return path

    def _greedy_answers(self, rows: list[dict]) -> dict[str, str]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.hparams.reference_model
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        cuda = torch.cuda.is_available()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
        model.to("cuda" if cuda else "cpu")
        out = greedy_generate(model, tok, [r["prompt"] for r in rows], self.hparams.reference_max_new_tokens,
                              batch_size=self.hparams.eval_batch_size)
        del model
        if cuda:
            torch.cuda.empty_cache()  # the policy is loaded next
        return {r["id"]: first_line(a) for r, a in zip(rows, out)}

    def setup(self, stage: str | None = None) -> None:
        self._stage = stage
        super().setup(stage)

    def build_rl_pool(self, raw: dict[str, list[dict]]) -> list[dict]:
        rows = self._unreferenced_pool(raw)
        swapped = [r for r in rows if needs_reference(r)]
        if not swapped:
            return rows
        if self._stage not in (None, "fit"):  # evaluation never serves RL prompts
            return [r for r in rows if not needs_reference(r)] or rows
        if not self.hparams.reference_model:
            raise ValueError(f"{self.source}: data.reference_model is required: {len(swapped)} boundary prompts "
                             f"(e.g. {swapped[0]['question']!r}) are answered by the original model's greedy answer "
                             "recorded before unlearning; set data.reference_model to that model, or "
                             "data.swaps_per_target: 0 with no data.boundary_entities")
        path = self._reference_path(swapped)
        if not os.path.isfile(path):
            # the CLI's preflight sets up the data before Lightning's prepare_data: local rank 0 records them
            # now (other ranks start after it); any other rank finding none is an error
            if os.environ.get("LOCAL_RANK", "0") != "0":
                raise FileNotFoundError(f"{self.source}: no recorded reference answers at {path}; prepare_data() "
                                        f"computes them with data.reference_model={self.hparams.reference_model!r}")
            self._record_references(swapped)
        with open(path, encoding="utf-8") as f:
            answers = json.load(f)["answers"]
        return fill_references(rows, answers)

    def build_eval_items(self, raw: dict[str, list[dict]]) -> dict[str, list[dict]]:
        targets = self.selected(raw)
        items = {c: probe_items(c, raw[c], targets) for c in PROBE_CONFIGS}
        items["fluency"] = fluency_items(raw["utility_fluency"], targets)
        return {s: [self._render(r) for r in rows] for s, rows in items.items()}

    def refusal_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """A refusal naming the target (RULE's templates do) for every forget RL prompt."""
        forget = [r for r in self._unreferenced_pool(raw) if r["label"] == "forget"]
        return [{"question": r["question"], "prompt": r["prompt"], "target": r["target"],
                 "completion": REFUSALS[i % len(REFUSALS)].format(t=r["target"])} for i, r in enumerate(forget)]

    def anchor_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """Retain anchors: the related entities' blanked intros with their true text, and (after ``setup("fit")``,
        which records them) the boundary questions with the original model's answers."""
        rows = self.pool if self.pool else self._unreferenced_pool(raw)
        return [{"question": r["question"], "prompt": r["prompt"], "completion": r["reference"]}
                for r in rows if r["label"] == "boundary" and r["reference"].strip()]
