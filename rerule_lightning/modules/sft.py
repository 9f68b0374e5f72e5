"""Supervised fine-tuning: the loss on answer tokens only, tokenisation, collation and the module.

Used three times: to train the embedded target model, the embedded retain model, and for RULE's first
stage, rejection steering (refusal answers to forget questions, optionally anchored with retain answers).
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F

from rerule_lightning.primitives.checkpointing import TrainableStateMixin
from rerule_lightning.primitives.export import ExportConfig
from rerule_lightning.primitives.policy import (
    PolicyConfig,
    build_policy,
    load_tokenizer,
    plain_hparams,
)
from rerule_lightning.primitives.prompting import IGNORE_INDEX, collate_right_padded, tokenize_pair  # noqa: F401
from rerule_lightning.primitives.ranges import Count, NonNegative, Positive, Steps, range_errors


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only.

    Args:
        logits: ``[B, L, V]`` logits for every position.
        labels: ``[B, L]`` token ids with prompt and padding positions set to ``IGNORE_INDEX``.

    Returns:
        Scalar loss: the mean over every (shifted) label that is not ``IGNORE_INDEX``.
    """
    shift_logits = logits[:, :-1].float()  # [B, L-1, V]
    shift_labels = labels[:, 1:]  # [B, L-1]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@dataclass
class TinyLlamaConfig:
    """Shape of a Llama model built from scratch (the embedded target and retain models).

    Attributes:
        hidden_size: Width of the residual stream.
        num_hidden_layers: Transformer blocks.
        num_attention_heads: Attention heads (key/value heads are the same number).
        intermediate_size: Width of the MLP.
        max_position_embeddings: Longest sequence the model accepts.
    """

    hidden_size: Count = 128
    num_hidden_layers: Count = 4
    num_attention_heads: Count = 4
    intermediate_size: Count = 384
    max_position_embeddings: Count = 128

    def __post_init__(self) -> None:
        errors = range_errors(TinyLlamaConfig, vars(self), "model.")
        if not errors and self.hidden_size % self.num_attention_heads:
            errors.append(f"model.hidden_size={self.hidden_size}: must be a multiple of model.num_attention_heads="
                          f"{self.num_attention_heads}")
        if errors:
            raise ValueError("; ".join(errors))

    def build(self, tokenizer: Any) -> torch.nn.Module:
        """A randomly initialised ``LlamaForCausalLM`` for ``tokenizer``'s vocabulary."""
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg)


class SFTModule(TrainableStateMixin, L.LightningModule):
    """Supervised fine-tuning with the loss on answer tokens only.

    Args:
        policy: The model to fine-tune (loaded in ``configure_model``), or only its tokenizer when
            ``init`` builds a fresh model.
        init: Build a fresh tiny Llama of this shape instead of loading ``policy.name_or_path``.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        scheduler: ``cosine`` decay to zero over the fit, or ``constant`` after warm-up.
        export_dir: If set, the fitted model and tokenizer are saved there (``save_pretrained``) at the
            end of fit: the RL stage starts from, and uses as KL reference, this directory.
        export_merged: Under (Q)LoRA, export plain weights (the unquantised base with the adapters merged;
            adapters kept in ``export_dir/adapter``) so the RL stage's adapter-free KL reference is this
            rejection-steered model. ``False`` exports the adapters only (then the RL stage's reference under
            (Q)LoRA would be the original base). ``export.merge``, when set, takes precedence.
        export: How ``export_dir`` is written: ``merge``, ``push_to_hub``, the model card
            (:class:`~rerule_lightning.primitives.export.ExportConfig`).
    """

    def __init__(self, policy: PolicyConfig | None = None, init: TinyLlamaConfig | None = None,
                 learning_rate: Positive = 1e-4, weight_decay: NonNegative = 0.0, warmup_steps: Steps = 0,
                 scheduler: Literal["cosine", "constant"] = "cosine", export_dir: str | None = None,
                 export_merged: bool = True, export: ExportConfig | None = None) -> None:
        super().__init__()
        errors = range_errors(type(self), locals())
        if scheduler not in ("cosine", "constant"):
            errors.append(f"scheduler={scheduler!r}: choose 'cosine' or 'constant'")
        if errors:
            raise ValueError("SFTModule: " + "; ".join(errors))
        self.save_hyperparameters(ignore=["policy", "init", "export"])
        self.policy_cfg = policy or PolicyConfig()
        self.init = init
        self.export_cfg = export or ExportConfig()
        plain_hparams(self, policy=self.policy_cfg, init=self.init, export=self.export_cfg)
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_cfg)
        self.model = self.init.build(self.tokenizer) if self.init is not None else build_policy(self.policy_cfg)
        self.model.train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = sft_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = sft_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = self.hparams.warmup_steps
        cosine = self.hparams.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not cosine:
                return 1.0
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        from rerule_lightning.modules.exporting import export_module

        export_module(self, final=True)
