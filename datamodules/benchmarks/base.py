"""``BenchmarkDataModule``: the common part of the real benchmarks (TOFU, MUSE-Books, MUSE-News, RWKU).

A subclass loads and validates its rows (:meth:`load_raw`), builds the RL prompt pool (:meth:`build_rl_pool`),
the evaluation items per split (:meth:`build_eval_items`), its :class:`~rerule_lightning.evaluation.suite.EvalSuite`
(:meth:`build_suite`) and the rejection-steering pairs (:meth:`refusal_pairs`, :meth:`anchor_pairs`). The base
renders every prompt with one function (:func:`rerule_lightning.primitives.prompting.format_prompt`), enforces "never
train on evaluation probes", serves balanced RL batches (:class:`~datamodules.forget_retain.BalancedPromptBatches`)
and one evaluation dataloader per split.

Rendering: a row whose ``prompt`` is already a string (a completion-style prefix such as MUSE's raw text)
is used verbatim; otherwise ``question`` is rendered in ``prompt_format`` (``chat``: the tokenizer's chat
template; ``raw``: ``Question: ...\\nAnswer:`` after ``few_shot`` demonstrations from :meth:`few_shot_pairs`).

Probe rule: a *boundary* RL prompt whose normalised question (lower case, single spaces, no surrounding
punctuation) equals the question of any evaluation item is an error (we would reward answering an item we
later measure). *Forget* RL prompts are exempt: training to refuse forget questions is the method, and the
forget splits measure exactly that.
"""

import hashlib
import inspect
import json
import os
import random
import re
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities.parsing import save_hyperparameters

from datamodules.forget_retain import PROMPT_COLUMNS, BalancedPromptBatches, PromptPoolLoaders
from rerule_lightning.evaluation.suite import EvalSuite
from rerule_lightning.modules.eval_hooks import ReferenceItems
from rerule_lightning.primitives.prompting import format_prompt
from rerule_lightning.primitives.ranges import Count, CountOrNull, Steps, UnitOpen, range_errors

EVAL_COLUMNS = ("id", "split", "prompt", "question", "answer", "value", "paraphrased_answer", "perturbed_answer",
                "target")
LABELS = ("forget", "boundary")


def normalise_question(text: str) -> str:
    """Lower case, single spaces, surrounding punctuation and spaces removed (the probe-leak comparison)."""
    return re.sub(r"\s+", " ", text).strip().strip(".?!:;,\"' ").lower()


def data_note(dataset: str, message: str) -> None:
    """One line about the data (a tolerated quirk's count, prompt counts) on stdout, from rank 0 only."""
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
        print(f"{dataset}: {message}", flush=True)


def stable_sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn with ``random.Random(seed)``, kept in their original order (all rows if ``n`` is None)."""
    if n is None or len(rows) <= n:
        return list(rows)
    keep = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def probe_index(items: dict[str, list[dict]]) -> dict[str, tuple[str, str]]:
    """Normalised question -> ``(split, id)`` of the (first) evaluation item asking it."""
    seen: dict[str, tuple[str, str]] = {}
    for split, rows in items.items():
        for r in rows:
            seen.setdefault(normalise_question(r["question"]), (split, r["id"]))
    return seen


def check_no_probe_leak(pool: Sequence[dict], items: dict[str, list[dict]], dataset: str) -> None:
    """Raise ``ValueError`` when a boundary RL prompt's question is an evaluation item's question."""
    seen = probe_index(items)
    for r in pool:
        if r["label"] != "boundary" or not r["question"]:
            continue
        hit = seen.get(normalise_question(r["question"]))
        if hit is not None:
            raise ValueError(f"{dataset}: RL boundary prompt {r['id']!r} is the evaluation item {hit[1]!r} of "
                             f"split {hit[0]!r} (question {r['question'][:80]!r}); never train on evaluation probes")


class BenchmarkDataModule(PromptPoolLoaders, L.LightningDataModule):
    """RL prompts and per-split evaluation items of a real benchmark (subclass hooks below).

    Args:
        source: Hub id or local directory (``<source>/<config>/<split>.jsonl``); ``None`` takes the class's
            ``dataset_name``.
        batch_size: Prompts per training step on each rank (B).
        forget_fraction: Share of forget prompts in each training batch (RULE: 0.5).
        epoch_length: Batches per epoch (progress display only).
        eval_splits: Evaluated splits (a subset of the suite's, in this order); ``None`` evaluates all.
        eval_max_items: Cap on evaluation items per split (seeded subsample); ``None`` keeps all.
        eval_batch_size: Items per evaluation batch.
        seed: Seed of prompt order, RL subsets and evaluation subsamples.
        prompt_format: ``chat`` (the tokenizer's chat template; instruct models) or ``raw``
            (``Question: ...\\nAnswer:``; base models). Must agree with ``policy.use_chat_template``.
        tokenizer: Tokenizer directory or id whose chat template renders prompts (needed for ``chat``).
        few_shot: Raw format only: demonstrations prepended to every question prompt.
        cache_dir: ``datasets`` cache directory for hub downloads.
    """

    #: Hub id and default source of the benchmark (also the dataset name in error messages).
    dataset_name: str = ""

    def __init__(self, source: str | None = None, batch_size: Count = 16, forget_fraction: UnitOpen = 0.5,
                 epoch_length: Count = 1000, eval_splits: list[str] | None = None, eval_max_items: CountOrNull = None,
                 eval_batch_size: Count = 16, seed: int = 0, prompt_format: Literal["chat", "raw"] = "chat",
                 tokenizer: str | None = None, few_shot: Steps = 0, cache_dir: str | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if errors := range_errors(type(self), locals(), "data."):
            raise ValueError(f"{name}: " + "; ".join(errors))
        if prompt_format not in ("chat", "raw"):
            raise ValueError(f"{name}: data.prompt_format={prompt_format!r}: choose 'chat' or 'raw'")
        if few_shot and prompt_format == "chat":
            raise ValueError(f"{name}: data.few_shot={few_shot} needs data.prompt_format='raw'")
        # From the constructor frames (this class's and the subclass's arguments), never from LightningCLI's
        # instantiation context: nested in RejectionSteeringDataModule, that context holds the outer module's.
        save_hyperparameters(self, frame=inspect.currentframe())
        self.source = source or self.dataset_name
        if not self.source:
            raise ValueError(f"{name}: data.source is required (the class has no default dataset)")
        full = self.build_suite()
        splits = list(eval_splits) if eval_splits is not None else full.split_names
        unknown = [s for s in splits if s not in full.split_names]
        if unknown or not splits or len(set(splits)) != len(splits):
            raise ValueError(f"{name}: data.eval_splits={splits}: unknown or repeated split(s) {unknown}; "
                             f"choose from {full.split_names}")
        self.eval_splits = splits
        self.eval_suite: EvalSuite = full.subset(splits)
        self.pool: list[dict] = []
        self.eval_items: dict[str, list[dict]] = {}
        self.raw: dict[str, list[dict]] | None = None
        self._tokenizer: Any = None
        self._demos: list[tuple[str, str]] = []
        self._train: BalancedPromptBatches | None = None

    # ------------------------------------------------------------------------------ subclass hooks
    def load_raw(self) -> dict[str, list[dict]]:
        """Every ``config/split`` the module needs, loaded and validated (``SchemaError`` on bad rows)."""
        raise NotImplementedError

    def build_rl_pool(self, raw: dict[str, list[dict]]) -> list[dict]:
        """RL prompt rows (:data:`PROMPT_COLUMNS`; ``prompt`` may be ``None`` to render ``question``)."""
        raise NotImplementedError

    def build_eval_items(self, raw: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Evaluation items per split (:data:`EVAL_COLUMNS` but ``split``; ``prompt`` may be ``None``)."""
        raise NotImplementedError

    def build_suite(self) -> EvalSuite:
        """The benchmark's evaluation suite (cheap: called in ``__init__``, no data access)."""
        raise NotImplementedError

    def refusal_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """Rejection steering: ``{"question", "completion", "target"}`` refusals to forget questions."""
        raise NotImplementedError

    def anchor_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """Rejection steering retain anchors ``{"question", "completion"}`` (never evaluation probes)."""
        raise NotImplementedError

    def chat_options(self) -> dict[str, Any]:
        """Extra :func:`~rerule_lightning.primitives.prompting.format_prompt` arguments of the chat format (``system_prompt``,
        ``date_string``; default none)."""
        return {}

    def few_shot_pairs(self, raw: dict[str, list[dict]]) -> list[tuple[str, str]]:
        """(question, answer) demonstrations for the raw format's ``few_shot`` (default: none available)."""
        return []

    # ------------------------------------------------------------------------------------- glue
    @property
    def use_chat_template(self) -> bool:
        return self.hparams.prompt_format == "chat"

    def prepare_data(self) -> None:
        """Download (hub sources) and validate every needed split, so bad data fails before training."""
        self.load_raw()

    def prompt_tokenizer(self) -> Any:
        """The prompt-rendering tokenizer (loaded once; ``None`` in the raw format without a tokenizer)."""
        if self._tokenizer is None and self.hparams.tokenizer:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer)
        return self._tokenizer

    def render(self, question: str) -> str:
        """One question as the model sees it (the single source of prompt formatting)."""
        if self.use_chat_template:
            return format_prompt(question, self.prompt_tokenizer(), use_chat_template=True, **self.chat_options())
        return format_prompt(question, few_shot=self._demos)

    def _check_policy_format(self) -> None:
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        cfg = getattr(module, "policy_cfg", None)
        if cfg is not None and bool(cfg.use_chat_template) != self.use_chat_template:
            raise ValueError(f"policy.use_chat_template={cfg.use_chat_template} disagrees with "
                             f"data.prompt_format={self.hparams.prompt_format!r} (chat needs use_chat_template: true)")

    def setup(self, stage: str | None = None) -> None:
        self._check_policy_format()
        if self.raw is not None:
            return
        h, name = self.hparams, self.source
        if self.use_chat_template and not h.tokenizer and self._tokenizer is None:
            raise ValueError(f"{type(self).__name__}: data.prompt_format='chat' needs data.tokenizer")
        raw = self.load_raw()
        self._demos = list(self.few_shot_pairs(raw))[: h.few_shot] if h.few_shot else []
        if h.few_shot and len(self._demos) < h.few_shot:
            raise ValueError(f"{name}: data.few_shot={h.few_shot} but only {len(self._demos)} demonstrations exist")
        pool = [self._render_row(r) for r in self.build_rl_pool(raw)]
        _check_pool(pool, name)
        built = self.build_eval_items(raw)
        missing = [s for s in self.eval_splits if s not in built]
        if missing:
            raise ValueError(f"{name}: build_eval_items returned no split(s) {missing}")
        check_no_probe_leak(pool, built, name)
        items = {}
        for s in self.eval_splits:
            rows = [{**self._render_row(r), "split": s} for r in built[s]]
            _check_items(rows, s, name)
            items[s] = stable_sample(rows, h.eval_max_items, h.seed)
        self.pool, self.eval_items, self.raw = pool, items, raw

    def _render_row(self, row: dict) -> dict:
        prompt = row.get("prompt")
        return {**row, "prompt": prompt if isinstance(prompt, str) else self.render(row["question"])}

    def reference_items(self, eval_splits: list[str] | None = None) -> ReferenceItems:
        """The retain reference's items: this datamodule's own rows of its suite's forget-quality split and MIA
        splits (``eval_splits`` is ignored: the datamodule already chose and subsampled them; after
        :meth:`setup`). Prompts are rendered already."""
        suite = self.eval_suite
        names = [n for n in dict.fromkeys([suite.forget_quality_split, *(suite.mia or ())]) if n]
        return ReferenceItems(suite, {n: self.eval_items[n] for n in names}, self.data_signature(), rendered=True,
                              data_id={"data_signature": self.data_signature(), "source": self.source})

    def data_signature(self) -> str:
        """Hash of the evaluated items (ids, prompts, answers, options) and the suite: the retain-reference
        cache key (call after :meth:`setup`)."""
        if self.raw is None:
            raise RuntimeError("data_signature() needs setup() first")
        payload = {"dataset": self.source, "class": type(self).__qualname__, "suite": self.eval_suite.name,
                   "items": {s: [[r[c] for c in ("id", "prompt", "answer", "paraphrased_answer", "perturbed_answer")]
                                 for r in rows] for s, rows in self.eval_items.items()}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_pool(pool: list[dict], dataset: str) -> None:
    ids = set()
    for r in pool:
        missing = [c for c in PROMPT_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"{dataset}: RL prompt row {r.get('id')!r} lacks {missing}")
        if r["label"] not in LABELS:
            raise ValueError(f"{dataset}: RL prompt {r['id']!r}: label {r['label']!r} not in {LABELS}")
        if r["id"] in ids:
            raise ValueError(f"{dataset}: RL prompt id {r['id']!r} is repeated")
        ids.add(r["id"])
    for label in LABELS:
        if not any(r["label"] == label for r in pool):
            raise ValueError(f"{dataset}: the RL pool has no {label} prompts")


def _check_items(rows: list[dict], split: str, dataset: str) -> None:
    if not rows:
        raise ValueError(f"{dataset}: evaluation split {split!r} has no items")
    ids = set()
    for r in rows:
        missing = [c for c in EVAL_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"{dataset}: evaluation item {r.get('id')!r} of split {split!r} lacks {missing}")
        if r["id"] in ids:
            raise ValueError(f"{dataset}: evaluation item id {r['id']!r} is repeated in split {split!r}")
        ids.add(r["id"])


__all__ = ["EVAL_COLUMNS", "LABELS", "PROMPT_COLUMNS", "BenchmarkDataModule", "check_no_probe_leak",
           "normalise_question", "probe_index", "stable_sample"]
