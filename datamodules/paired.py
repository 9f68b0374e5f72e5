"""``PairedUnlearningDataModule``: paired forget / retain batches for the loss-based baselines
(:class:`rerule_lightning.modules.loss.LossUnlearningModule`), over any RL datamodule's data.

It wraps a ``benchmark`` datamodule (the embedded :class:`datamodules.forget_retain.ForgetRetainDataModule`, or a
real benchmark's :class:`datamodules.benchmarks.base.BenchmarkDataModule`: TOFU, MUSE) and takes from it:

* the forget items (``forget_rows: all``, the usual baseline setting): every forget fact of the embedded world
  (its canonical question and answer), every question-answer pair of TOFU's forget split, every (prefix,
  continuation) window of MUSE's raw forget corpus; or only the RL pool's forget prompts (``pool``);
* the retain items: the RL pool's boundary prompts with their reference answers (what RULE trains on as
  allowed questions);
* a refusal for each forget item (IdkDPO's preferred answer): the embedded world's refusal template naming the
  author (one seeded template per author), a benchmark's own refusal pairs, else ``idk_answer``;
* evaluation: the wrapped datamodule's splits, suite, dataloaders and retain-reference items, unchanged, so a
  baseline is scored exactly as RULE and ReRULE are.

Training batch ``t`` holds ``batch_size`` forget items (drawn without replacement in a fresh seeded permutation
per pass) and, for each, one retain item drawn at random; both are pure functions of ``(seed, t)``. Each pass
starts at ``trainer.global_step`` (restored from a checkpoint), so a resumed fit sees the same batches. An epoch
is one pass over the forget items (``ceil(forget / batch_size)`` batches).
"""

import math
import random
from collections.abc import Callable
from typing import Any, Literal

import lightning as L

from datamodules.benchmarks.base import normalise_question
from datamodules.forget_retain import PositionedBatches, permuted_index
from rerule_lightning.primitives.prompting import format_prompt
from rerule_lightning.primitives.ranges import Count, range_errors

BATCH_COLUMNS = ("forget_id", "forget_prompt", "forget_answer", "forget_idk", "retain_id", "retain_prompt",
                 "retain_answer")


class PairedBatches(PositionedBatches):
    """Deterministic, resumable stream of paired forget / retain batches (a Lightning train iterable).

    Args:
        forget: Forget rows (``id``, ``prompt``, ``answer``, ``idk``).
        retain: Retain rows (``id``, ``prompt``, ``answer``).
        batch_size: Forget items per batch (each gets one retain item).
        seed: Seed of the permutations and of the retain draws.
        start_fn: Returns the index of the next batch when a pass starts; ``None`` continues the internal count.
    """

    def __init__(self, forget: list[dict], retain: list[dict], batch_size: int, seed: int,
                 start_fn: Callable[[], int] | None = None) -> None:
        if not forget or not retain:
            raise ValueError(f"paired batches need forget and retain items (got {len(forget)} forget, "
                             f"{len(retain)} retain)")
        self.forget, self.retain, self.batch_size, self.seed = forget, retain, batch_size, seed
        self.epoch_length = math.ceil(len(forget) / batch_size)
        self.start_fn = start_fn
        self.position = 0

    def batch_at(self, position: int) -> dict[str, list[Any]]:
        """The batch at ``position`` (a pure function of seed and position)."""
        n = len(self.forget)
        rows = []
        for k in range(position * self.batch_size, (position + 1) * self.batch_size):
            f = self.forget[permuted_index(n, k, self.seed * 1_000_003)]
            r = self.retain[random.Random(self.seed * 7_919 + k * 104_729 + 1).randrange(len(self.retain))]
            rows.append((f, r))
        return {"forget_id": [f["id"] for f, _ in rows], "forget_prompt": [f["prompt"] for f, _ in rows],
                "forget_answer": [f["answer"] for f, _ in rows], "forget_idk": [f["idk"] for f, _ in rows],
                "retain_id": [r["id"] for _, r in rows], "retain_prompt": [r["prompt"] for _, r in rows],
                "retain_answer": [r["answer"] for _, r in rows]}


class PairedUnlearningDataModule(L.LightningDataModule):
    """Paired forget / retain training batches and the wrapped datamodule's evaluation.

    Args:
        benchmark: The datamodule whose data is used (nested ``class_path`` / ``init_args``):
            ``datamodules.ForgetRetainDataModule``, ``datamodules.TOFUDataModule``, ``datamodules.MUSEDataModule``.
        batch_size: Forget items per step (each paired with one retain item).
        forget_rows: ``all`` (every forget fact / QA pair / text window) or ``pool`` (the RL pool's forget
            prompts only).
        idk_answer: Refusal used for IdkDPO where the data has none of its own.
        seed: Seed of the forget order, the retain draws and the refusal templates.
    """

    def __init__(self, benchmark: L.LightningDataModule, batch_size: Count = 8,
                 forget_rows: Literal["all", "pool"] = "all", idk_answer: str = "I don't know.",
                 seed: int = 0) -> None:
        super().__init__()
        if errors := range_errors(type(self), locals(), "data."):
            raise ValueError("; ".join(errors))
        if forget_rows not in ("all", "pool"):
            raise ValueError(f"data.forget_rows={forget_rows!r}: choose 'all' or 'pool'")
        if not hasattr(benchmark, "pool") or not hasattr(benchmark, "eval_splits"):
            raise ValueError(f"data.benchmark: {type(benchmark).__name__} has no RL pool / eval_splits; use "
                             "ForgetRetainDataModule or a BenchmarkDataModule (TOFU, MUSE)")
        self.save_hyperparameters(ignore=["benchmark"])
        inner = dict(benchmark.hparams)
        # the evaluation glue reads the wrapped datamodule's settings (eval_batch_size, prompt_format, world_dir)
        for k in ("eval_batch_size", "prompt_format", "world_dir"):
            if k in inner:
                self.hparams[k] = inner[k]
        self.hparams["benchmark"] = {"class": f"{type(benchmark).__module__}.{type(benchmark).__qualname__}",
                                     **inner}
        self.benchmark = benchmark
        self.forget: list[dict] = []
        self.retain: list[dict] = []
        self._train: PairedBatches | None = None

    # evaluation: exactly the wrapped datamodule's
    @property
    def eval_splits(self) -> list[str]:
        return self.benchmark.eval_splits

    @property
    def eval_suite(self) -> Any:
        return self.benchmark.eval_suite

    @property
    def eval_items(self) -> dict[str, list[dict]]:
        return self.benchmark.eval_items

    def reference_items(self, eval_splits: list[str] | None = None) -> Any:
        return self.benchmark.reference_items(eval_splits)

    def eval_vocabulary(self) -> frozenset[str] | None:
        """The wrapped datamodule's vocabulary of the degenerate-output rule (``None`` when it has none)."""
        fn = getattr(self.benchmark, "eval_vocabulary", None)
        return fn() if callable(fn) else None

    def val_dataloader(self) -> Any:
        return self.benchmark.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.benchmark.test_dataloader()

    def prepare_data(self) -> None:
        self.benchmark.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        bench = self.benchmark
        if getattr(bench, "trainer", None) is None and getattr(self, "trainer", None) is not None:
            bench.trainer = self.trainer
        bench.setup(stage)
        if self.forget:
            return
        h = self.hparams
        world = getattr(bench, "world", None)
        refusal = self._refusals(world)
        forget = self._forget_rows(world) if h.forget_rows == "all" else self._pool_forget()
        self.forget = [{**r, "idk": refusal(r)} for r in forget]
        self.retain = [{**r, "answer": r["reference"]} for r in bench.pool if r["label"] == "boundary"]
        if not self.forget or not self.retain:
            raise ValueError(f"data.benchmark: {len(self.forget)} forget and {len(self.retain)} retain items; "
                             "the paired baselines need both")

    def _forget_rows(self, world: Any) -> list[dict]:
        """Every forget item with its answer: the embedded world's facts (canonical question), TOFU's forget
        split, or every (prefix, continuation) window of MUSE's raw forget corpus."""
        bench = self.benchmark
        if world is not None:
            return [{"id": r["id"], "prompt": format_prompt(r["question"]), "question": r["question"],
                     "answer": r["answer"], "target": r["author"]} for r in world["forget"]]
        raw = getattr(bench, "raw", None) or {}
        if "raw/forget" in raw:  # MUSE: the forget text itself, cut as the RL prompts are
            from datamodules.benchmarks.muse import cut_windows

            b = bench.hparams
            rows = [{"id": f"forget-{w['doc']}-{w['start']}", "question": w["prefix"], "answer": w["continuation"],
                     "target": bench.target_name, "style": "completion"}
                    for w in cut_windows([r["text"] for r in raw["raw/forget"]], b.prefix_words,
                                         b.continuation_words)]
        elif "forget" in raw:  # TOFU: the forget split's question-answer pairs
            rows = [{"id": f"forget/{i}", "question": r["question"], "answer": r["answer"],
                     "target": self._tofu_author(i)} for i, r in enumerate(raw["forget"])]
        else:
            raise ValueError(f"data.forget_rows='all': {type(bench).__name__} has no forget answers this module "
                             "knows (embedded world, TOFU, MUSE); use data.forget_rows: pool")
        render = getattr(bench, "_render", None) or bench._render_row  # MUSE renders by row style
        return [{**r, "prompt": render({**r, "prompt": None})["prompt"]} for r in rows]

    def _tofu_author(self, i: int) -> str:
        names = {j: a["name"] for a in self.benchmark.authors(self.benchmark.raw["forget"]) for j in a["rows"]}
        return names.get(i, "")

    def _pool_forget(self) -> list[dict]:
        """The RL pool's forget prompts with answers: their reference, else the forget row with the same
        question (TOFU) or the window's continuation (MUSE)."""
        rows = [r for r in self.benchmark.pool if r["label"] == "forget"]
        known: dict[str, str] = {}
        if any(not r["reference"] for r in rows):
            world = getattr(self.benchmark, "world", None)
            try:
                known = {normalise_question(r["question"]): r["answer"] for r in self._forget_rows(world)}
            except ValueError:
                known = {}
        out = [{**r, "answer": r["reference"] or known.get(normalise_question(r["question"]), "")} for r in rows]
        missing = [r["id"] for r in out if not r["answer"]]
        if missing:
            raise ValueError(f"data.forget_rows='pool': no answer for forget prompt(s) {missing[:3]}")
        return out

    def _refusals(self, world: Any) -> Callable[[dict], str]:
        """Refusal answer per forget row: embedded templates naming the author, a benchmark's pairs, else
        ``idk_answer``."""
        h, bench = self.hparams, self.benchmark
        if world is not None and "refusal_templates" in world:
            templates = [r["template"] for r in world["refusal_templates"]]
            rng = random.Random(h.seed)
            authors = sorted({r["author"] for r in world["forget"]})
            by_author = {a: rng.choice(templates).format(name=a) for a in authors}
            return lambda r: by_author.get(r.get("target", ""), h.idk_answer)
        pairs = {}
        if hasattr(bench, "refusal_pairs") and getattr(bench, "raw", None) is not None:
            pairs = {normalise_question(p["question"]): p["completion"] for p in bench.refusal_pairs(bench.raw)}
        return lambda r: pairs.get(normalise_question(r.get("question") or ""), h.idk_answer)

    def train_dataloader(self) -> PairedBatches:
        if self._train is None:
            trainer = getattr(self, "trainer", None)
            self._train = PairedBatches(self.forget, self.retain, self.hparams.batch_size, self.hparams.seed,
                                        start_fn=(lambda: self.trainer.global_step) if trainer is not None else None)
        return self._train


__all__ = ["PairedBatches", "PairedUnlearningDataModule"]
