"""Rejection steering (RULE's first stage) on any real benchmark: SFT pairs for :class:`rerule_lightning.modules.sft.SFTModule`.

A seeded ``refusal_fraction`` of the benchmark's :meth:`~datamodules.benchmarks.base.BenchmarkDataModule.refusal_pairs`
(forget questions answered with a refusal that names the target, e.g. "That's beyond my knowledge of X.")
plus ``retain_anchor_ratio`` retain anchors per refusal (:meth:`anchor_pairs`, never evaluation probes: checked
against the benchmark's evaluation items). Prompts are rendered by the benchmark (same format as RL and
evaluation), completions formatted for it (raw: leading space), tokenised as SFT does (loss on completion + eos).
"""

import random
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.benchmarks.base import BenchmarkDataModule, data_note, normalise_question, probe_index
from rerule_lightning.primitives.prompting import collate_right_padded, format_answer, tokenize_pair
from rerule_lightning.primitives.ranges import AtLeastTwo, Count, NonNegative, UnitAboveZero, range_errors


def select_pairs(refusals: list[dict], anchors: list[dict], refusal_fraction: float, retain_anchor_ratio: float,
                 seed: int) -> list[dict]:
    """The seeded refusal subset, then the anchors (``round(ratio * refusals)``, at most all), each in source order.

    Returns:
        ``{"question", "prompt", "completion", "kind"}`` rows, kind ``refusal`` or ``anchor``; ``prompt`` is the
        pair's own rendered prompt (a completion-style prefix used verbatim) or ``None`` (render ``question``).
    """
    rng = random.Random(seed)
    n_ref = max(1, round(refusal_fraction * len(refusals)))
    ref_idx = sorted(rng.sample(range(len(refusals)), n_ref))
    n_anchor = min(len(anchors), round(retain_anchor_ratio * n_ref))
    anchor_idx = sorted(rng.sample(range(len(anchors)), n_anchor))
    def row(p: dict, kind: str) -> dict:
        return {"question": p["question"], "prompt": p.get("prompt"), "completion": p["completion"], "kind": kind}

    return [row(refusals[i], "refusal") for i in ref_idx] + [row(anchors[i], "anchor") for i in anchor_idx]


class RejectionSteeringDataModule(L.LightningDataModule):
    """Serves tokenised refusal + retain-anchor pairs of a benchmark.

    Args:
        benchmark: The benchmark datamodule (nested ``class_path`` / ``init_args``); its ``tokenizer`` defaults
            to this module's.
        tokenizer: Tokenizer directory or id of the model being steered.
        refusal_fraction: Fraction of the forget questions given a refusal target (RULE: a small part).
        retain_anchor_ratio: Retain anchors per refusal pair (0 = refusal-only SFT).
        batch_size: Pairs per optimizer step.
        max_length: Longest tokenised pair accepted; longer pairs fail before training.
        seed: Sampling and shuffling seed.
        min_refusals: Fewest refusal examples rejection steering may train on; fewer fail in ``setup`` before
            any training, naming the count and this knob (RULE trains on about 300 per target).
    """

    def __init__(self, benchmark: BenchmarkDataModule, tokenizer: str, refusal_fraction: UnitAboveZero = 0.5,
                 retain_anchor_ratio: NonNegative = 1.0, batch_size: Count = 8, max_length: AtLeastTwo = 512,
                 seed: int = 0, min_refusals: Count = 8) -> None:
        super().__init__()
        if errors := range_errors(type(self), locals(), "data."):
            raise ValueError("; ".join(errors))
        self.save_hyperparameters(ignore=["benchmark"])
        self.hparams["benchmark"] = {"class": f"{type(benchmark).__module__}.{type(benchmark).__qualname__}",
                                     **dict(benchmark.hparams)}
        self.benchmark = benchmark
        self.pairs: list[dict] | None = None
        self.examples: list[dict[str, list[int]]] | None = None
        self._tokenizer: Any = None

    def prepare_data(self) -> None:
        self.benchmark.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        from rerule_lightning.primitives.policy import PolicyConfig, load_tokenizer

        bench, h = self.benchmark, self.hparams
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        cfg = getattr(module, "policy_cfg", None)
        if cfg is not None and bool(cfg.use_chat_template) != bench.use_chat_template:
            raise ValueError(f"policy.use_chat_template={cfg.use_chat_template} disagrees with "
                             f"data.benchmark.prompt_format={bench.hparams.prompt_format!r}")
        if self.examples is not None:
            return
        self._tokenizer = load_tokenizer(PolicyConfig(name_or_path=h.tokenizer))
        if bench.prompt_tokenizer() is None:
            bench._tokenizer = self._tokenizer
        bench.setup(stage)
        anchors = bench.anchor_pairs(bench.raw)
        probes = probe_index(bench.eval_items)
        for a in anchors:
            hit = probes.get(normalise_question(a["question"]))
            if hit is not None:
                raise ValueError(f"{bench.source}: retain anchor {a['question'][:80]!r} is evaluation item "
                                 f"{hit[1]!r} of split {hit[0]!r}; never train on evaluation probes")
        refusals = bench.refusal_pairs(bench.raw)
        self.pairs = select_pairs(refusals, anchors, h.refusal_fraction, h.retain_anchor_ratio, h.seed)
        n_ref = sum(p["kind"] == "refusal" for p in self.pairs)
        if n_ref < h.min_refusals:
            raise ValueError(f"{bench.source}: rejection steering would train on {n_ref} refusal example(s) "
                             f"(data.refusal_fraction={h.refusal_fraction} of {len(refusals)} forget prompts), fewer "
                             f"than data.min_refusals={h.min_refusals}; raise data.refusal_fraction, add forget "
                             "material, or lower data.min_refusals")
        data_note(bench.source, f"rejection steering: {n_ref} refusals + "
                  f"{len(self.pairs) - n_ref} retain anchors (of {len(refusals)} forget prompts, {len(anchors)} anchors)")
        self.examples = [tokenize_pair(self._tokenizer,
                                       p["prompt"] if isinstance(p["prompt"], str) else bench.render(p["question"]),
                                       format_answer(p["completion"], bench.use_chat_template), h.max_length)
                         for p in self.pairs]

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.examples, batch_size=self.hparams.batch_size, shuffle=True, generator=g,
                          collate_fn=lambda b: collate_right_padded(b, self._tokenizer.pad_token_id))


__all__ = ["RejectionSteeringDataModule", "select_pairs"]
