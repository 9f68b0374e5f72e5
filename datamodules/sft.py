"""DataModule for supervised stages on the embedded world: target, retain and rejection steering."""

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.embedded import SftMode, load_world, sft_pairs
from rerule_lightning.primitives.prompting import collate_right_padded, tokenize_pair
from rerule_lightning.primitives.ranges import Count, NonNegative, UnitAboveZero, range_errors


class EmbeddedSFTDataModule(L.LightningDataModule):
    """Serves tokenised prompt/answer pairs of one SFT stage.

    Args:
        world_dir: The saved world (``rerule prepare`` output).
        tokenizer: Tokenizer directory.
        mode: ``target``, ``retain`` or ``rejection_steering`` (see :func:`datamodules.embedded.sft_pairs`).
        refusal_fraction: Rejection steering: fraction of forget (fact, paraphrase) questions with a refusal target.
        retain_anchor_ratio: Rejection steering: retain pairs mixed in per refusal pair (0 disables).
        batch_size: Pairs per optimizer step.
        max_length: Longest tokenised pair accepted; longer pairs fail before training.
        seed: Sampling and shuffling seed.
    """

    def __init__(self, world_dir: str = ".cache/rerule/embedded/world",
                 tokenizer: str = ".cache/rerule/embedded/tokenizer", mode: SftMode = "rejection_steering",
                 refusal_fraction: UnitAboveZero = 1.0, retain_anchor_ratio: NonNegative = 1.0, batch_size: Count = 32,
                 max_length: Count = 128, seed: int = 0) -> None:
        super().__init__()
        if errors := range_errors(type(self), locals()):
            raise ValueError("; ".join(errors))
        self.save_hyperparameters()
        self.examples: list[dict[str, list[int]]] | None = None
        self._tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        from transformers import AutoTokenizer

        h = self.hparams
        self._tokenizer = AutoTokenizer.from_pretrained(h.tokenizer)
        pairs = sft_pairs(load_world(h.world_dir), h.mode, seed=h.seed, refusal_fraction=h.refusal_fraction,
                          retain_anchor_ratio=h.retain_anchor_ratio)
        self.examples = [tokenize_pair(self._tokenizer, p["prompt"], p["completion"], h.max_length) for p in pairs]

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.examples, batch_size=self.hparams.batch_size, shuffle=True, generator=g,
                          collate_fn=lambda b: collate_right_padded(b, self._tokenizer.pad_token_id))
