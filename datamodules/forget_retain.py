"""``ForgetRetainDataModule``: the RL prompt pool and the per-split evaluation data.

Training batches are balanced between forget and boundary prompts (``forget_fraction`` of each batch,
0.5 by default, as RULE's data files interleave them 1:1). Within each label, prompts are drawn without
replacement in a fresh seeded permutation per pass. The batch of step ``t`` is a pure function of
``(seed, t)``. Each pass over the iterable starts at the batch index implied by ``trainer.global_step``
(restored exactly from a checkpoint), not at a counter that Lightning's one-batch prefetch would have moved
ahead, so a resumed fit sees exactly the batches the uninterrupted fit would have seen.

Evaluation dataloaders (validation and test) serve one split each, in :data:`EVAL_SPLITS` order, every
question paraphrase of every fact (of one half of the authors with ``eval_half``: the selection half, on which
a benchmark chooses its points, or the report half, on which it reports them; :func:`datamodules.embedded.derive_halves`);
items are dicts of lists (``prompt``, ``question``, ``answer``,
``value``, ``paraphrased_answer``, ``perturbed_answer``, ``id``, ``target``).
"""

import inspect
import os
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities.parsing import save_hyperparameters
from torch.utils.data import DataLoader

from datamodules.embedded import HALVES, half_key, load_world, world_halves, world_vocabulary
from rerule_lightning.evaluation.evaluator import FORGET, HOLDOUT
from rerule_lightning.evaluation.suite import EvalSuite, embedded_suite
from rerule_lightning.modules.eval_hooks import ReferenceItems, dir_signature
from rerule_lightning.primitives.prompting import format_prompt
from rerule_lightning.primitives.ranges import Count, CountOrNull, UnitOpen, range_errors

EVAL_SPLITS = ("forget", "boundary_hard", "boundary_easy", "retain", "world_facts", "holdout")
PROMPT_COLUMNS = ("id", "prompt", "question", "label", "kind", "reference", "target", "value")


def permuted_index(n: int, k: int, seed: int) -> int:
    """The ``k``-th row drawn from ``n`` rows in passes, each pass a fresh permutation seeded by ``seed + pass``."""
    perm_id, idx = divmod(k, n)
    perm = list(range(n))
    random.Random(seed + perm_id).shuffle(perm)
    return perm[idx]


class PositionedBatches:
    """A train iterable whose batch at each position is a pure function of that position (:meth:`batch_at`):
    one pass serves up to the end of the current ``epoch_length``; ``start_fn`` (when given) sets the position
    at the start of each pass, so a resumed fit continues exactly where it stopped."""

    epoch_length: int
    position: int
    start_fn: Callable[[], int] | None

    def batch_at(self, position: int) -> dict[str, list[Any]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, list[Any]]]:
        if self.start_fn is not None:
            self.position = int(self.start_fn())
        end = (self.position // self.epoch_length + 1) * self.epoch_length
        while self.position < end:
            batch = self.batch_at(self.position)
            self.position += 1
            yield batch

    def __len__(self) -> int:
        return self.epoch_length


class BalancedPromptBatches(PositionedBatches):
    """Deterministic, resumable, endless stream of balanced prompt batches (a Lightning train iterable).

    Args:
        forget: Forget prompt rows.
        boundary: Boundary prompt rows.
        batch_size: Prompts per batch on each rank.
        forget_fraction: Share of forget prompts in each batch.
        seed: Seed of the per-pass permutations.
        epoch_length: Batches per "epoch" (only for progress display and epoch-based hooks).
        rank: This process's rank; ranks take disjoint slices of a global batch.
        world_size: Number of processes.
        start_fn: Returns the index of the next batch when a pass starts (the datamodule derives it from
            ``trainer.global_step``); ``None`` continues from the internal counter.
    """

    def __init__(self, forget: list[dict], boundary: list[dict], batch_size: int, forget_fraction: float,
                 seed: int, epoch_length: int, rank: int = 0, world_size: int = 1,
                 start_fn: Callable[[], int] | None = None) -> None:
        if not forget or not boundary:
            raise ValueError(f"the RL pool needs forget and boundary prompts (got {len(forget)} forget, "
                             f"{len(boundary)} boundary)")
        self.forget, self.boundary = forget, boundary
        self.n_forget = round(batch_size * world_size * forget_fraction)
        self.n_boundary = batch_size * world_size - self.n_forget
        self.batch_size, self.seed, self.epoch_length = batch_size, seed, epoch_length
        self.rank, self.world_size = rank, world_size
        self.start_fn = start_fn
        self.position = 0  # batches already served (global step of the next batch)

    def _draw(self, rows: list[dict], start: int, n: int, salt: int) -> list[dict]:
        seed = self.seed * 1_000_003 + salt * 7919
        return [rows[permuted_index(len(rows), k, seed)] for k in range(start, start + n)]

    def batch_at(self, position: int) -> dict[str, list[Any]]:
        """The batch this rank gets at ``position`` (a pure function of seed, position and rank)."""
        rows = (self._draw(self.forget, position * self.n_forget, self.n_forget, 1)
                + self._draw(self.boundary, position * self.n_boundary, self.n_boundary, 2))
        random.Random(self.seed + position).shuffle(rows)
        mine = rows[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        return {c: [r[c] for r in mine] for c in PROMPT_COLUMNS}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def _eval_collate(rows: list[dict]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in rows[0]}


class PromptPoolLoaders:
    """Dataloaders shared by the RL datamodules: balanced, resumable RL batches from ``self.pool`` and one
    evaluation dataloader per split of ``self.eval_splits`` over ``self.eval_items``.

    The datamodule provides ``pool``, ``eval_items``, ``eval_splits``, ``_train`` (``None`` until first use)
    and the hyper-parameters ``batch_size``, ``forget_fraction``, ``seed``, ``epoch_length``, ``eval_batch_size``.
    """

    #: The columns of a training batch (what a reward receives besides ``prompts``; the CLI probes rewards with them).
    prompt_columns = PROMPT_COLUMNS

    def train_dataloader(self) -> BalancedPromptBatches:
        if self._train is None:
            h = self.hparams
            trainer = getattr(self, "trainer", None)
            rank = trainer.global_rank if trainer is not None else 0
            world_size = trainer.world_size if trainer is not None else 1
            self._train = BalancedPromptBatches(
                [r for r in self.pool if r["label"] == "forget"], [r for r in self.pool if r["label"] == "boundary"],
                h.batch_size, h.forget_fraction, h.seed, h.epoch_length, rank, world_size,
                start_fn=self._next_batch_index if trainer is not None else None)
        return self._train

    def _next_batch_index(self) -> int:
        """Batches already trained on: optimizer steps divided by the module's steps per batch (μ)."""
        module = self.trainer.lightning_module
        mu = int(getattr(module, "hparams", {}).get("num_iterations", 1) or 1)
        return self.trainer.global_step // mu

    def _eval_loaders(self) -> list[DataLoader]:
        return [DataLoader(self.eval_items[s], batch_size=self.hparams.eval_batch_size, shuffle=False,
                           collate_fn=_eval_collate) for s in self.eval_splits]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()


class ForgetRetainDataModule(PromptPoolLoaders, L.LightningDataModule):
    """RL prompts (forget + boundary) for training and per-split evaluation data.

    Args:
        world_dir: Saved embedded world (``rerule prepare`` output).
        preset: Which RL boundary pool to use: ``easy`` or ``hard``; ``None`` takes the world's own preset.
        batch_size: Prompts per training step on each rank (B); each is sampled G times by the module.
        forget_fraction: Share of forget prompts in each training batch (RULE: 0.5).
        epoch_length: Batches per epoch (progress display only; use ``trainer.max_steps`` for budgets).
        eval_splits: Splits evaluated in validation and test, each its own dataloader.
        eval_max_items: Cap on evaluation items per split (every paraphrase counts as an item); ``None``
            evaluates all of them.
        eval_batch_size: Items per evaluation batch.
        seed: Seed of the prompt order and of the evaluation subsample.
        eval_half: Evaluate every item (``all``), or only the items of the selection half (``select``) or the
            report half (``report``) of each split's authors, fixed per world (``halves.json`` of the world);
            applied before ``eval_max_items``.
    """

    def __init__(self, world_dir: str = ".cache/rerule/embedded/world", preset: Literal["easy", "hard"] | None = None,
                 batch_size: Count = 16, forget_fraction: UnitOpen = 0.5, epoch_length: Count = 1000,
                 eval_splits: list[str] | None = None, eval_max_items: CountOrNull = None,
                 eval_batch_size: Count = 64, seed: int = 0,
                 eval_half: Literal["all", "select", "report"] = "all") -> None:
        super().__init__()
        if eval_half not in ("all", *HALVES):
            raise ValueError(f"data.eval_half={eval_half!r}: choose 'all', 'select' or 'report'")
        if errors := range_errors(type(self), locals(), "data."):
            raise ValueError("; ".join(errors))
        if preset not in (None, "easy", "hard"):
            raise ValueError(f"data.preset={preset!r}: choose 'easy' or 'hard'")
        splits = list(eval_splits) if eval_splits is not None else list(EVAL_SPLITS[:5])
        unknown = [s for s in splits if s not in EVAL_SPLITS]
        if unknown:
            raise ValueError(f"data.eval_splits: unknown split(s) {unknown}; choose from {list(EVAL_SPLITS)}")
        # from this frame, never LightningCLI's instantiation context (nested in PairedUnlearningDataModule that
        # context holds the outer module's arguments)
        save_hyperparameters(self, frame=inspect.currentframe())
        self.eval_splits = splits
        #: What is evaluated: every metric on every split, forget quality, MIA forget vs holdout, utility.
        self.eval_suite: EvalSuite = embedded_suite(splits)
        self.world: Any = None
        self.pool: list[dict] = []
        self._train: BalancedPromptBatches | None = None
        self.eval_items: dict[str, list[dict]] = {}

    def reference_items(self, eval_splits: list[str] | None = None) -> ReferenceItems:
        """The forget and holdout items the retain reference is computed on: the subsample a datamodule with
        these settings evaluates (``forget`` and ``holdout`` appended when absent, so earlier subsamples are
        unchanged), rows not rendered (the evaluator renders them as it renders the evaluated ones)."""
        h = self.hparams
        splits = list(eval_splits) if eval_splits is not None else list(self.eval_splits)
        splits += [s for s in (FORGET, HOLDOUT) if s not in splits]
        half = h.get("eval_half", "all")
        dm = ForgetRetainDataModule(world_dir=h.world_dir, eval_splits=splits, eval_max_items=h.eval_max_items,
                                    eval_batch_size=h.eval_batch_size, seed=h.seed, eval_half=half)
        dm.setup("test")
        signature = {"world_dir": dir_signature(h.world_dir), "eval_splits": splits,
                     "eval_max_items": h.eval_max_items, "seed": h.seed}
        if half != "all":  # the signature of every earlier (whole-split) reference is unchanged
            signature["eval_half"] = half
        return ReferenceItems(embedded_suite([FORGET, HOLDOUT]), {s: dm.eval_items[s] for s in (FORGET, HOLDOUT)},
                              signature, rendered=False, data_id={"world_dir": os.path.realpath(h.world_dir)})

    def eval_vocabulary(self) -> frozenset[str]:
        """The world's words (:func:`datamodules.embedded.world_vocabulary`), for the degenerate-output rule."""
        if self.world is None:
            self.setup()
        return world_vocabulary(self.world)

    def setup(self, stage: str | None = None) -> None:
        if self.world is not None:
            return
        h = self.hparams
        self.world = load_world(h.world_dir)
        name = "rl_prompts" if h.preset is None else f"rl_prompts_{h.preset}"
        if name not in self.world:
            raise ValueError(f"data.preset={h.preset!r}: the world at {h.world_dir} has no {name} split")
        self.pool = [{**r, "prompt": format_prompt(r["prompt_text"]), "question": r["prompt_text"]}
                     for r in self.world[name]]
        rng = random.Random(h.seed)
        half = h.get("eval_half", "all")
        keep = world_halves(h.world_dir, self.world) if half != "all" else None
        for s in self.eval_splits:
            allowed = set(keep[s][half]) if keep is not None else None
            items = [{"id": f"{r['id']}#{qi}", "prompt": format_prompt(q), "question": q, "answer": r["answer"],
                      "value": r["value"], "paraphrased_answer": r["paraphrased_answer"],
                      "perturbed_answer": r["perturbed_answer"], "target": r["author"],
                      "collision": r.get("collision", "none"), "split": s}
                     for r in self.world[s] for qi, q in enumerate(r["questions"])
                     if allowed is None or half_key(r) in allowed]
            if not items and half != "all":
                raise ValueError(f"data.eval_half={half!r}: split {s!r} of the world at {h.world_dir} has no item "
                                 "in that half (a split of one author has no report half)")
            if h.eval_max_items is not None and len(items) > h.eval_max_items:
                items = sorted(rng.sample(items, h.eval_max_items), key=lambda x: x["id"])
            self.eval_items[s] = items
