"""MUSE-Books and MUSE-News (``muse-bench/MUSE-Books``, ``muse-bench/MUSE-News``): schema, RL prompts, eval items.

What is loaded (hub layout = local ``<source>/<config>/<split>.jsonl``):

==========  ===============================================  ==================
config      splits                                           columns
==========  ===============================================  ==================
raw         forget, retain1, retain2, holdout                text
verbmem     forget                                           prompt, gt
knowmem     forget_qa, retain_qa, forget_qa_icl, retain_qa_icl question, answer
privleak    forget, retain, holdout                          text
==========  ===============================================  ==================

RL prompts (completion prompts, never questions):

* **forget** (label ``forget``, the model should refuse): windows cut from ``raw/forget``;
* **boundary** (label ``boundary``, kind ``boundary_retain_text``): windows cut from ``raw/retain1`` (the retain
  set MUSE offers for unlearning; ``retain2`` feeds KnowMem-retain and stays evaluation-only), with the true
  continuation as the reference answer.

A window is ``prefix_words`` words of the text (the prompt, verbatim, original spacing kept) followed by
``continuation_words`` words (the reference). Windows tile each document without overlap, starting at its
first word; a window that does not fit at the end is dropped. **Never train on evaluation probes**: a window
(prefix + continuation) that shares any run of ``overlap_ngram`` normalised words (lower case, ``[a-z0-9']+``
tokens) with a VerbMem prompt followed by its ground truth, or with a KnowMem question (the whole question when
it is shorter), is discarded: :func:`muse_probes` lists those texts. KnowMem QA
is never an RL prompt. From the remaining windows ``num_*_prompts`` are drawn with ``random.Random(seed)``
(all of them when there are fewer), in document order.

Prompt format: MUSE targets are base models (Llama-2-7B fine-tuned). Completion prompts (RL windows and
VerbMem prompts) are the text itself in the raw format; KnowMem uses ``Question: ...\\nAnswer:`` after the
split's own few-shot demonstrations (``forget_qa_icl`` for KnowMem-forget, ``retain_qa_icl`` for
KnowMem-retain), each ``Question: q\\nAnswer: a\\n\\n``, and ends with ``Answer: `` (a trailing space, as MUSE's
own prompts do: :func:`knowmem_prompt`). In the chat format every prompt becomes the user message
(demonstrations dropped). Privleak items have an empty prompt: Min-K% scores the text from the BOS token.
"""

import os
import random
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from datamodules.benchmarks.base import BenchmarkDataModule, data_note
from datamodules.benchmarks.sources import SchemaError, is_local, load_validated, local_candidates
from rerule_lightning.evaluation.suite import EvalSuite, SplitSpec
from rerule_lightning.primitives.prompting import format_prompt
from rerule_lightning.primitives.ranges import Count, CountOrNull, Range, UnitOpen, range_errors

MUSE_SCHEMAS: dict[str, dict[str, str]] = {
    "raw": {"text": "text"},
    "verbmem": {"prompt": "text", "gt": "text"},
    "knowmem": {"question": "text", "answer": "text"},
    "privleak": {"text": "text"},
}
MUSE_SPLITS: dict[str, tuple[str, ...]] = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "privleak": ("forget", "retain", "holdout"),
}
_WORD = re.compile(r"\S+")
_NORM = re.compile(r"[a-z0-9']+")


def norm_words(text: str) -> list[str]:
    """Lower-cased alphanumeric word tokens (apostrophes kept) used for overlap checks."""
    return _NORM.findall(text.lower())


def ngram_index(texts: Sequence[str], n: int) -> dict[int, set[tuple[str, ...]]]:
    """Runs of normalised words to look for, keyed by run length: every ``n``-word run of each text, or the
    whole text when it is shorter than ``n`` words."""
    out: dict[int, set[tuple[str, ...]]] = {}
    for t in texts:
        w = norm_words(t)
        if 0 < len(w) < n:
            out.setdefault(len(w), set()).add(tuple(w))
        out.setdefault(n, set()).update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return out


def shares_ngram(text: str, index: dict[int, set[tuple[str, ...]]]) -> bool:
    """Whether ``text`` contains any run of words in ``index`` (see :func:`ngram_index`)."""
    w = norm_words(text)
    return any(tuple(w[i:i + k]) in grams for k, grams in index.items() for i in range(len(w) - k + 1))


def cut_windows(texts: Sequence[str], prefix_words: int, continuation_words: int) -> list[dict[str, Any]]:
    """Non-overlapping (prefix, continuation) windows tiling each text from its first word.

    Returns:
        Rows ``{"doc", "start", "prefix", "continuation"}``; ``prefix`` and ``continuation`` are verbatim
        slices of the text (inner whitespace kept), ``start`` the index of the window's first word.
    """
    if prefix_words < 1 or continuation_words < 1:
        raise ValueError(f"prefix_words={prefix_words}, continuation_words={continuation_words}: must be >= 1")
    size = prefix_words + continuation_words
    out = []
    for d, text in enumerate(texts):
        spans = [m.span() for m in _WORD.finditer(text)]
        for s in range(0, len(spans) - size + 1, size):
            p_end, c_start, c_end = spans[s + prefix_words - 1][1], spans[s + prefix_words][0], spans[s + size - 1][1]
            out.append({"doc": d, "start": s, "prefix": text[spans[s][0]:p_end],
                        "continuation": text[c_start:c_end]})
    return out


def completion_prompts(texts: Sequence[str], *, label: str, source: str, num_prompts: int, prefix_words: int,
                       continuation_words: int, seed: int, probes: Sequence[str], overlap_ngram: int,
                       target: str) -> list[dict[str, Any]]:
    """RL completion prompts cut from ``texts`` (see the module docstring).

    Args:
        texts: The documents (``raw`` split rows' ``text``).
        label: ``forget`` (reference "") or ``boundary`` (reference = the true continuation).
        source: Split name used in ids (``forget`` -> ids ``forget-<doc>-<word>``).
        num_prompts: How many windows to draw (all when fewer remain).
        prefix_words: Words in the prompt.
        continuation_words: Words in the continuation (the boundary reference).
        seed: Seed of the draw.
        probes: Evaluation texts no window may overlap: each VerbMem ``prompt + " " + gt`` (so a window
            straddling the two is caught) and each KnowMem question.
        overlap_ngram: Run length, in normalised words, that counts as an overlap.
        target: Entity name for the row's ``target`` column.
    """
    if label not in ("forget", "boundary"):
        raise ValueError(f"label={label!r}: choose 'forget' or 'boundary'")
    index = ngram_index(probes, overlap_ngram)
    windows = [w for w in cut_windows(texts, prefix_words, continuation_words)
               if not shares_ngram(w["prefix"] + " " + w["continuation"], index)]
    if num_prompts < len(windows):
        keep = set(random.Random(seed).sample(range(len(windows)), num_prompts))
        windows = [w for i, w in enumerate(windows) if i in keep]
    kind = "forget" if label == "forget" else "boundary_retain_text"
    return [{"id": f"{source}-{w['doc']}-{w['start']}", "question": w["prefix"], "label": label, "kind": kind,
             "reference": w["continuation"] if label == "boundary" else "", "target": target,
             "value": w["continuation"] if label == "boundary" else "", "style": "completion"}
            for w in windows]


def muse_probes(verbmem: Sequence[dict], knowmem: Sequence[dict]) -> list[str]:
    """Evaluation texts RL windows must not overlap: VerbMem ``prompt + " " + gt`` and KnowMem questions."""
    return [r["prompt"] + " " + r["gt"] for r in verbmem] + [r["question"] for r in knowmem]


def _item(split: str, i: int, question: str, answer: str, target: str, style: str,
          few_shot: list[list[str]] | None = None) -> dict[str, Any]:
    return {"id": f"{split}-{i}", "split": split, "question": question, "answer": answer, "value": answer,
            "paraphrased_answer": None, "perturbed_answer": [], "target": target, "style": style,
            "few_shot": few_shot or []}


def verbmem_items(rows: Sequence[dict], target: str) -> list[dict[str, Any]]:
    """VerbMem-forget items: the prompt verbatim, the ground-truth continuation as the answer."""
    return [_item("verbmem_forget", i, r["prompt"], r["gt"], target, "completion") for i, r in enumerate(rows)]


def knowmem_items(split: str, rows: Sequence[dict], icl: Sequence[dict], few_shot: int,
                  target: str) -> list[dict[str, Any]]:
    """KnowMem items with the first ``few_shot`` rows of the split's ICL set as demonstrations."""
    demos = [[d["question"], d["answer"]] for d in icl[:max(few_shot, 0)]]
    return [_item(split, i, r["question"], r["answer"], target, "question", demos) for i, r in enumerate(rows)]


def privleak_items(split: str, rows: Sequence[dict], target: str) -> list[dict[str, Any]]:
    """Min-K% items: empty prompt, the text as the answer."""
    return [_item(split, i, "", r["text"], target, "text") for i, r in enumerate(rows)]


def render_muse(row: dict[str, Any], chat: bool, tokenizer: Any = None) -> str:
    """The prompt the model sees for an RL row or eval item (see the module docstring)."""
    style = row.get("style", "question")
    if style == "text":
        return ""
    if style == "completion" and not chat:
        return row["question"]
    if chat:
        return format_prompt(row["question"], tokenizer, use_chat_template=True)
    return knowmem_prompt(row["question"], [tuple(p) for p in row.get("few_shot") or []])


def knowmem_prompt(question: str, demos: Sequence[tuple[str, str]]) -> str:
    """MUSE's KnowMem prompt: each demonstration ``Question: q\nAnswer: a\n\n``, then ``Question: q\nAnswer: ``
    with the trailing space MUSE (and open-unlearning) end the prompt with."""
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in demos) + f"Question: {question}\nAnswer: "


def verbmem_mismatch(verbmem: Sequence[dict], forget_texts: Sequence[str], n: int) -> tuple[int, str, str] | None:
    """First VerbMem row whose prompt shares no ``n``-word run with the raw forget corpus, as (row, field, problem)."""
    index = ngram_index(forget_texts, n)
    for i, r in enumerate(verbmem):
        if not shares_ngram(r["prompt"], {n: index.get(n, set())}):
            return i, "prompt", f"not found in raw/forget (no run of {n} words in common): VerbMem prompts are " \
                                "excerpts of the forget corpus; is the verbmem config from another corpus?"
    return None


def knowmem_overlaps(rows: Sequence[dict], icl: Sequence[dict]) -> list[tuple[int, int]]:
    """``(icl row, evaluated row)`` for every evaluated question that an ICL demonstration also asks
    (normalised text). MUSE keeps such demonstrations (MUSE-Books: ``retain_qa_icl`` row 0 is ``retain_qa``
    rows 28-29), so the datamodule only counts them unless ``icl_overlap: error``."""
    demos: dict[str, int] = {}
    for i, r in enumerate(icl):
        demos.setdefault(" ".join(norm_words(r["question"])), i)
    return sorted((demos[k], j) for j, r in enumerate(rows) if (k := " ".join(norm_words(r["question"]))) in demos)


# ----------------------------------------------------------------------------------------- Lightning glue
HUB_IDS = {"books": "muse-bench/MUSE-Books", "news": "muse-bench/MUSE-News"}
DEFAULT_TARGETS = {"books": "Harry Potter", "news": "BBC News"}
REFUSALS = ("I'm sorry, but I can't share the rest of this text from {t}.",
            "I can't provide the continuation of this passage from {t}.",
            "I'm not able to reproduce text from {t}.")
MUSE_EVAL_SPLITS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak_forget", "privleak_holdout")


def muse_suite(name: str) -> EvalSuite:
    """MUSE's four numbers: VerbMem-forget (ROUGE-L F1 of 128-token greedy continuations against the ground truth
    cut to 128 tokens), KnowMem-forget and KnowMem-retain (ROUGE-L F1, 32 tokens, cut at a blank line or
    "Question"), privleak (Min-K% AUC of privleak/forget vs privleak/holdout, relative to the retrain model's).
    ROUGE as MUSE computes it: ``rouge_score`` with ``use_stemmer=False``. VerbMem also reports extraction
    strength (open-unlearning does) from its teacher-forced pass."""
    km = {"max_new_tokens": 32, "stop": ["\n\n", "Question"], "teacher_forced": False, "rouge": "rouge_score_nostem"}
    return EvalSuite(
        name,
        [SplitSpec("verbmem_forget", max_new_tokens=128, teacher_forced=True, rouge="rouge_score_nostem",
                   reference_max_tokens=128),
         SplitSpec("knowmem_forget", **km), SplitSpec("knowmem_retain", **km),
         SplitSpec("privleak_forget", generate=False), SplitSpec("privleak_holdout", generate=False)],
        mia=("privleak_forget", "privleak_holdout"),
        headline={"verbmem_forget": "verbmem_forget/rouge_l_f1", "knowmem_forget": "knowmem_forget/rouge_l_f1",
                  "knowmem_retain": "knowmem_retain/rouge_l_f1", "privleak": "privleak_forget/privleak"})


class MUSEDataModule(BenchmarkDataModule):
    """MUSE-Books (``corpus: books``) or MUSE-News (``corpus: news``): RL completion prompts and MUSE's suite.

    Args:
        corpus: ``books`` (``muse-bench/MUSE-Books``) or ``news`` (``muse-bench/MUSE-News``); picks the default
            source and the suite name (``muse_books`` / ``muse_news``).
        target_name: What is being forgotten, for refusal texts and the ``target`` column (default
            ``Harry Potter`` / ``BBC News``).
        retain_split: ``raw`` split the boundary prompts are cut from (``retain1``; ``retain2`` is KnowMem-retain's).
        num_forget_prompts: Forget windows drawn (all when fewer remain after probe exclusion).
        num_boundary_prompts: Boundary windows drawn.
        prefix_words: Words of text in each RL prompt.
        continuation_words: Words of the reference continuation.
        overlap_ngram: A window sharing this many consecutive words with a VerbMem or KnowMem probe is dropped.
        icl_shots: KnowMem demonstrations per split from its ``*_icl`` set (``None``: all, as MUSE does).
        icl_overlap: An ICL demonstration that is also an evaluated KnowMem question: ``keep`` (MUSE does; the
            count is printed) or ``error``.
        skip_empty_raw: Skip ``raw`` rows whose text is empty (MUSE-News ``raw/forget`` row 821 is ``""``; the
            count is printed); ``false`` makes them an error.
        source, batch_size, forget_fraction, epoch_length, eval_splits, eval_max_items, eval_batch_size, seed,
        prompt_format, tokenizer, cache_dir: see :class:`BenchmarkDataModule` (``prompt_format`` defaults to
            ``raw``: MUSE targets are base models).
    """

    def __init__(self, corpus: Literal["books", "news"] = "books", target_name: str | None = None,
                 retain_split: str = "retain1", num_forget_prompts: Count = 256, num_boundary_prompts: Count = 256,
                 prefix_words: Count = 32, continuation_words: Count = 32, overlap_ngram: Count = 8,
                 icl_shots: Annotated[int, Range(0, integer=True, special=((None, "all"),))] | None = None,
                 icl_overlap: Literal["keep", "error"] = "keep", skip_empty_raw: bool = True,
                 source: str | None = None, batch_size: Count = 16, forget_fraction: UnitOpen = 0.5,
                 epoch_length: Count = 1000, eval_splits: list[str] | None = None,
                 eval_max_items: CountOrNull = None, eval_batch_size: Count = 16, seed: int = 0,
                 prompt_format: Literal["chat", "raw"] = "raw", tokenizer: str | None = None,
                 cache_dir: str | None = None) -> None:
        if corpus not in HUB_IDS:
            raise ValueError(f"MUSEDataModule: data.corpus={corpus!r}: choose 'books' or 'news'")
        if icl_overlap not in ("keep", "error"):
            raise ValueError(f"MUSEDataModule: data.icl_overlap={icl_overlap!r}: choose 'keep' or 'error'")
        if retain_split not in ("retain1", "retain2"):
            raise ValueError(f"MUSEDataModule: data.retain_split={retain_split!r}: choose 'retain1' or 'retain2'")
        if errors := range_errors(type(self), locals(), "data."):
            raise ValueError("MUSEDataModule: " + "; ".join(errors))
        self.corpus = corpus
        self.dataset_name = HUB_IDS[corpus]
        self.target_name = target_name or DEFAULT_TARGETS[corpus]
        super().__init__(source=source, batch_size=batch_size, forget_fraction=forget_fraction,
                         epoch_length=epoch_length, eval_splits=eval_splits, eval_max_items=eval_max_items,
                         eval_batch_size=eval_batch_size, seed=seed, prompt_format=prompt_format,
                         tokenizer=tokenizer, few_shot=0, cache_dir=cache_dir)

    def build_suite(self) -> EvalSuite:
        return muse_suite(f"muse_{self.corpus}")

    def load_raw(self) -> dict[str, list[dict]]:
        """Every MUSE config/split, validated; then the cross-field checks: each VerbMem prompt is an excerpt
        of raw/forget, no KnowMem ICL demonstration is an evaluated question."""
        h = self.hparams
        raw = {f"{c}/{s}": load_validated(self.source, c, s, {"text": "str"} if c == "raw" and h.skip_empty_raw
                                          else MUSE_SCHEMAS[c], dataset=self.source, cache_dir=h.cache_dir)
               for c, splits in MUSE_SPLITS.items() for s in splits}
        for s in MUSE_SPLITS["raw"]:
            rows = raw[f"raw/{s}"]
            empty = [i for i, r in enumerate(rows) if not r["text"].strip()]
            if len(empty) == len(rows):
                raise SchemaError(self.source, "raw", s, None, "text", f"all {len(rows)} rows are empty text",
                                  path=self._path("raw", s))
            if empty:  # kept in place (window ids keep the dataset row index); an empty text gives no window
                data_note(self.source, f"raw {s}: skipped {len(empty)} of {len(rows)} rows with empty text "
                          f"(rows {empty[:10]}{' ...' if len(empty) > 10 else ''}); MUSE's data has them")
        forget = [r["text"] for r in raw["raw/forget"]]
        bad = verbmem_mismatch(raw["verbmem/forget"], forget, self.hparams.overlap_ngram)
        if bad:
            raise SchemaError(self.source, "verbmem", "forget", *bad, path=self._path("verbmem", "forget"))
        for split in ("forget_qa", "retain_qa"):
            icl = f"{split}_icl"
            overlaps = knowmem_overlaps(raw[f"knowmem/{split}"], raw[f"knowmem/{icl}"])
            if overlaps and self.hparams.icl_overlap == "error":
                i, row = overlaps[0]
                raise SchemaError(self.source, "knowmem", icl, i, "question", f"is also evaluation question row "
                                  f"{row} (a demonstration would leak it; data.icl_overlap: keep tolerates it, as "
                                  "MUSE does)", path=self._path("knowmem", icl))
            if overlaps:
                data_note(self.source, f"knowmem {icl}: {len({i for i, _ in overlaps})} demonstration(s) also asked "
                          f"as {len(overlaps)} evaluated {split} question(s) (rows {[r for _, r in overlaps]}); kept, "
                          "as MUSE does")
        return raw

    def _path(self, config: str, split: str) -> str | None:
        found = [p for p in local_candidates(self.source, config, split) if os.path.isfile(p)]
        return found[0] if is_local(self.source) and found else None

    def _render(self, row: dict) -> dict:
        tok = self.prompt_tokenizer() if self.use_chat_template else None
        return {**row, "prompt": render_muse(row, self.use_chat_template, tok)}

    def _windows(self, raw: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
        h = self.hparams
        probes = muse_probes(raw["verbmem/forget"], raw["knowmem/forget_qa"] + raw["knowmem/retain_qa"])
        common = {"prefix_words": h.prefix_words, "continuation_words": h.continuation_words, "probes": probes,
                  "overlap_ngram": h.overlap_ngram, "target": self.target_name}
        forget = completion_prompts([r["text"] for r in raw["raw/forget"]], label="forget", source="forget",
                                    num_prompts=h.num_forget_prompts, seed=h.seed, **common)
        boundary = completion_prompts([r["text"] for r in raw[f"raw/{h.retain_split}"]], label="boundary",
                                      source=h.retain_split, num_prompts=h.num_boundary_prompts, seed=h.seed + 1,
                                      **common)
        return forget, boundary

    def build_rl_pool(self, raw: dict[str, list[dict]]) -> list[dict]:
        forget, boundary = self._windows(raw)
        return [self._render(r) for r in forget + boundary]

    def build_eval_items(self, raw: dict[str, list[dict]]) -> dict[str, list[dict]]:
        n = self.hparams.icl_shots
        t = self.target_name

        def shots(split: str) -> int:
            return len(raw[f"knowmem/{split}_icl"]) if n is None else n

        items = {"verbmem_forget": verbmem_items(raw["verbmem/forget"], t),
                 "knowmem_forget": knowmem_items("knowmem_forget", raw["knowmem/forget_qa"],
                                                 raw["knowmem/forget_qa_icl"], shots("forget_qa"), t),
                 "knowmem_retain": knowmem_items("knowmem_retain", raw["knowmem/retain_qa"],
                                                 raw["knowmem/retain_qa_icl"], shots("retain_qa"), t),
                 "privleak_forget": privleak_items("privleak_forget", raw["privleak/forget"], t),
                 "privleak_holdout": privleak_items("privleak_holdout", raw["privleak/holdout"], t)}
        return {s: [self._render(r) for r in rows] for s, rows in items.items()}

    def refusal_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """A refusal naming the corpus for every forget RL prompt (templates cycle in prompt order)."""
        forget, _ = self._windows(raw)
        return [{"question": r["question"], "prompt": self._render(r)["prompt"], "target": r["target"],
                 "completion": REFUSALS[i % len(REFUSALS)].format(t=r["target"])} for i, r in enumerate(forget)]

    def anchor_pairs(self, raw: dict[str, list[dict]]) -> list[dict]:
        """Retain anchors: each boundary window with its true continuation."""
        _, boundary = self._windows(raw)
        return [{"question": r["question"], "prompt": self._render(r)["prompt"], "completion": r["reference"]}
                for r in boundary]
