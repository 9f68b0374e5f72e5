"""``LossUnlearningModule``: the loss-based unlearning baselines (GA, GradDiff, NPO, SimNPO, IdkDPO, RMU, each
optionally with a GDR or KLR retain regulariser) as one Lightning module.

A step takes one paired batch (:class:`datamodules.paired.PairedUnlearningDataModule`): B forget items (prompt,
original answer, refusal answer) and, for each, a retain item (prompt, answer). The loss is

    L = forget_weight · L_method(forget [, refusal]) + retain_weight · L_reg(retain)

with L_method one of :mod:`rerule_lightning.unlearning.losses` (GradDiff is GA with the GDR regulariser; RMU
has its own retain term, the activation match over the retain answer tokens, in place of L_reg) and L_reg = NLL
(``gdr``), KL(π_frozen ‖ π_θ) (``klr``) or 0 (``none``). The published recipes (open-unlearning's trainers, the
WMDP RMU) and what the shipped ``configs/baselines/*.yaml`` still do differently are stated in each YAML. The
frozen model (NPO / IdkDPO reference, KLR, RMU) is the model before unlearning: a second frozen copy under full
fine-tuning (``reference_path``, default ``policy.name_or_path``), the same base
with adapters disabled under (Q)LoRA, so no second copy is held.

Shared with :class:`rerule_lightning.modules.grpo.GRPOUnlearningModule`: the ``policy`` config (full / LoRA /
QLoRA), the evaluator in validation and test (:class:`rerule_lightning.modules.eval_hooks.EvaluationHooks`), the
non-finite guard (a NaN / Inf loss or gradient skips the optimizer step, parameters and AdamW state untouched;
``max_consecutive_nonfinite`` in a row stop the fit after saving ``nonfinite_stop.ckpt``) and the checkpoint
checks. AdamW with a constant learning rate after ``warmup_steps`` linear warm-up steps.

Logged per step: ``train/loss``, ``train/forget_loss``, ``train/retain_loss`` and the cumulative answer tokens
trained on, ``train/forget_tokens`` and ``train/retain_tokens`` (restored from checkpoints).
"""

import contextlib
from typing import Annotated, Any, Literal

import lightning as L
import torch

from rerule_lightning.evaluation.evaluator import UnlearningEvaluator
from rerule_lightning.modules.eval_hooks import EvaluationHooks
from rerule_lightning.primitives.checkpointing import check_state_dict_matches
from rerule_lightning.primitives.export import ExportConfig
from rerule_lightning.primitives.guards import NonFiniteCounter, guarded_optimizer_step
from rerule_lightning.primitives.policy import (
    PolicyConfig,
    build_policy,
    load_base_model,
    load_tokenizer,
    plain_hparams,
    reference_context,
)
from rerule_lightning.primitives.prompting import collate_right_padded, format_answer, tokenize_pair
from rerule_lightning.primitives.ranges import Count, NonNegative, Positive, Range, Steps, range_errors
from rerule_lightning.unlearning import losses

Method = Literal["ga", "npo", "simnpo", "idkdpo", "rmu"]
Regularizer = Literal["none", "gdr", "klr"]
METHODS = ("ga", "npo", "simnpo", "idkdpo", "rmu")
REGULARIZERS = ("none", "gdr", "klr")


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer blocks of a causal LM (the first ``ModuleList`` named ``layers``), with its module path."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return name, module
    raise ValueError(f"{type(model).__name__}: no ModuleList named 'layers' (RMU needs the transformer blocks)")


class LossUnlearningModule(EvaluationHooks, L.LightningModule):
    """Loss-based unlearning on paired forget / retain batches (manual optimization).

    Args:
        policy: The model to unlearn (the model before unlearning, e.g. the embedded target) and how to train it.
        method: Forget loss: ``ga`` (gradient ascent), ``npo``, ``simnpo``, ``idkdpo`` or ``rmu``.
        regularizer: Retain term for ``ga`` / ``npo`` / ``simnpo`` / ``idkdpo``: ``gdr`` (NLL on retain; GA + GDR
            is GradDiff), ``klr`` (KL from the frozen model to the current one on retain answers) or ``none``.
            Ignored by ``rmu``, whose retain term is its activation match.
        reference_path: Frozen model under full fine-tuning; defaults to ``policy.name_or_path``. Ignored under
            (Q)LoRA (adapters disabled).
        learning_rate: AdamW learning rate (constant after warm-up).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        max_grad_norm: Gradient-norm clip; 0 disables.
        forget_weight: γ, weight of the forget term.
        retain_weight: α, weight of the retain term (regulariser or RMU's activation match).
        beta: β of NPO, SimNPO and IdkDPO.
        simnpo_gamma: SimNPO's reward margin γ.
        rmu_layer: Index of the transformer block whose output RMU steers.
        rmu_update_layers: Blocks whose parameters RMU updates; ``None`` = the three blocks up to ``rmu_layer``.
        rmu_param_filter: Substring a parameter's name must contain to be updated by RMU: ``mlp.down_proj`` (the
            WMDP recipe: the MLP output matrices of the updated blocks), ``mlp`` (every MLP matrix), ``""`` (all).
        rmu_steering_coeff: c, the norm of the control vector c·u.
        max_length: Longest tokenised prompt + answer accepted; longer items fail with the prompt named.
        eval_max_new_tokens: Greedy tokens per answer in validation / test.
        seed: Seed of RMU's random direction u.
        export_dir: If set, the model is exported there at the end of fit (and at each checkpoint of
            :class:`callbacks.ResumableCheckpoint`): :mod:`rerule_lightning.primitives.export`.
        eval_reference: Retain model directory for forget quality and privleak in validation / test.
        eval_report_path: Where ``test`` writes ``eval.json`` (rank zero); ``None`` writes nothing.
        max_consecutive_nonfinite: Skipped non-finite steps in a row after which the fit stops.
        export: How ``export_dir`` is written (:class:`~rerule_lightning.primitives.export.ExportConfig`).
    """

    def __init__(self, policy: PolicyConfig | None = None, method: Method = "npo", regularizer: Regularizer = "none",
                 reference_path: str | None = None, learning_rate: Positive = 1e-5, weight_decay: NonNegative = 0.01,
                 warmup_steps: Steps = 0, max_grad_norm: NonNegative = 1.0, forget_weight: NonNegative = 1.0,
                 retain_weight: NonNegative = 1.0, beta: Positive = 0.1, simnpo_gamma: Annotated[float, Range()] = 0.0,
                 rmu_layer: Steps = 1, rmu_update_layers: list[int] | None = None, rmu_param_filter: str = "mlp.down_proj",
                 rmu_steering_coeff: Positive = 20.0, max_length: Annotated[int, Range(2, integer=True)] = 512,
                 eval_max_new_tokens: Count = 32, seed: int = 0, export_dir: str | None = None,
                 eval_reference: str | None = None, eval_report_path: str | None = None,
                 max_consecutive_nonfinite: Count = 3, export: ExportConfig | None = None) -> None:
        super().__init__()
        errors = []
        if method not in METHODS:
            errors.append(f"method={method!r}: choose one of {', '.join(METHODS)}")
        if regularizer not in REGULARIZERS:
            errors.append(f"regularizer={regularizer!r}: choose one of {', '.join(REGULARIZERS)}")
        errors += range_errors(type(self), locals())
        if errors:
            raise ValueError("LossUnlearningModule: " + "; ".join(errors))
        self.save_hyperparameters(ignore=["policy", "export"])
        self.automatic_optimization = False
        self.policy_cfg = policy or PolicyConfig()
        self.export_cfg = export or ExportConfig()
        plain_hparams(self, policy=self.policy_cfg, export=self.export_cfg)
        self.model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.evaluator: UnlearningEvaluator | None = None
        self.nonfinite = NonFiniteCounter(limit=max_consecutive_nonfinite)
        self.tokens = {"forget": 0, "retain": 0}
        self._control: torch.Tensor | None = None

    @property
    def needs_frozen(self) -> bool:
        """Whether the step needs the model before unlearning (NPO, IdkDPO, RMU, KLR)."""
        h = self.hparams
        return h.method in ("npo", "idkdpo", "rmu") or (h.method != "rmu" and h.regularizer == "klr")

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        self.tokenizer = load_tokenizer(self.policy_cfg)
        self.model = build_policy(self.policy_cfg)
        if self.needs_frozen and self.policy_cfg.peft == "full":
            ref = load_base_model(h.reference_path or self.policy_cfg.name_or_path, self.policy_cfg)
            self.ref_model = ref.eval().requires_grad_(False)
        if h.method == "rmu":
            self._restrict_to_rmu_layers()

    def rmu_layers(self) -> list[int]:
        """The blocks RMU updates (``rmu_update_layers``, default the three up to ``rmu_layer``)."""
        h = self.hparams
        return list(h.rmu_update_layers) if h.rmu_update_layers is not None else \
            list(range(max(0, h.rmu_layer - 2), h.rmu_layer + 1))

    def _restrict_to_rmu_layers(self) -> None:
        prefix, blocks = decoder_layers(self.model)
        h = self.hparams
        bad = [i for i in [h.rmu_layer, *self.rmu_layers()] if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"LossUnlearningModule: rmu_layer / rmu_update_layers {bad} out of range: the model "
                             f"has {len(blocks)} blocks")
        keep = tuple(f"{prefix}.{i}." for i in self.rmu_layers())
        n = 0
        for name, p in self.model.named_parameters():
            on = p.requires_grad and name.startswith(keep) and h.rmu_param_filter in name
            p.requires_grad_(on)
            n += int(on)
        if n == 0:
            raise ValueError(f"LossUnlearningModule: no trainable parameter in blocks {self.rmu_layers()} matches "
                             f"rmu_param_filter={h.rmu_param_filter!r}")

    def configure_optimizers(self) -> Any:
        h = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=h.learning_rate, weight_decay=h.weight_decay)
        warm = h.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ data
    def encode(self, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        """``bos + prompt + answer + eos``, right-padded, labels on the answer (and eos) only."""
        chat = self.policy_cfg.use_chat_template
        rows = [tokenize_pair(self.tokenizer, p, format_answer(a, chat), self.hparams.max_length)
                for p, a in zip(prompts, answers)]
        return {k: v.to(self.device) for k, v in collate_right_padded(rows, self.tokenizer.pad_token_id).items()}

    def _frozen(self) -> Any:
        model = self.ref_model if self.ref_model is not None else self.model
        return model, (reference_context(model) if self.ref_model is None else contextlib.nullcontext())

    def _logits(self, enc: dict[str, torch.Tensor], frozen: bool = False) -> torch.Tensor:
        if not frozen:
            return self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # [B, L, V]
        model, ctx = self._frozen()
        with torch.no_grad(), ctx:
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # [B, L, V]

    def _hidden(self, enc: dict[str, torch.Tensor], frozen: bool = False) -> torch.Tensor:
        """Output of block ``rmu_layer`` (a forward hook; the forward stops being useful after it)."""
        model, ctx = self._frozen() if frozen else (self.model, contextlib.nullcontext())
        _, blocks = decoder_layers(model)
        seen: list[torch.Tensor] = []

        def hook(_m: Any, _i: Any, out: Any) -> None:
            seen.append(out[0] if isinstance(out, (tuple, list)) else out)

        handle = blocks[self.hparams.rmu_layer].register_forward_hook(hook)
        try:
            with ctx, (torch.no_grad() if frozen else contextlib.nullcontext()):
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        finally:
            handle.remove()
        return seen[0]  # [B, L, D]

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, list[Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
        """The step's loss and its parts.

        Returns:
            ``(loss, {"forget_loss", "retain_loss"}, forget answer tokens, retain answer tokens)``.
        """
        h = self.hparams
        f = self.encode(batch["forget_prompt"], batch["forget_answer"])  # [B, Lf]
        r = self.encode(batch["retain_prompt"], batch["retain_answer"])  # [B, Lr]
        n_f = int((f["labels"][:, 1:] != -100).sum())
        n_r = int((r["labels"][:, 1:] != -100).sum())
        zero = torch.zeros((), device=self.device)
        if h.method == "rmu":
            if self._control is None:
                self._control = losses.rmu_control_vector(self._hidden(f, frozen=True).size(-1), h.seed,
                                                          h.rmu_steering_coeff).to(self.device)
            # both terms over the answer tokens' positions (open-unlearning's mask), never the prompt
            forget = losses.rmu_forget_loss(self._hidden(f), losses.answer_positions(f["labels"]), self._control)
            retain = losses.rmu_retain_loss(self._hidden(r), self._hidden(r, frozen=True),
                                            losses.answer_positions(r["labels"]))
            return h.forget_weight * forget + h.retain_weight * retain, \
                {"forget_loss": forget.detach(), "retain_loss": retain.detach()}, n_f, n_r
        logits = self._logits(f)  # [B, Lf, V]
        if h.method == "ga":
            forget = losses.ga_loss(losses.masked_nll(logits, f["labels"]))
        elif h.method == "simnpo":
            logp, lengths = losses.sequence_logprob(logits, f["labels"])  # [B], [B]
            forget = losses.simnpo_loss(logp, lengths, h.beta, h.simnpo_gamma)
        elif h.method == "npo":
            logp, _ = losses.sequence_logprob(logits, f["labels"])  # [B]
            ref, _ = losses.sequence_logprob(self._logits(f, frozen=True), f["labels"])  # [B]
            forget = losses.npo_loss(logp, ref, h.beta)
        else:  # idkdpo
            i = self.encode(batch["forget_prompt"], batch["forget_idk"])  # [B, Li]
            logp_l, _ = losses.sequence_logprob(logits, f["labels"])  # [B]
            ref_l, _ = losses.sequence_logprob(self._logits(f, frozen=True), f["labels"])  # [B]
            logp_w, _ = losses.sequence_logprob(self._logits(i), i["labels"])  # [B]
            ref_w, _ = losses.sequence_logprob(self._logits(i, frozen=True), i["labels"])  # [B]
            forget = losses.idk_dpo_loss(logp_w, ref_w, logp_l, ref_l, h.beta)
        if h.regularizer == "none":
            retain = zero
            n_r = 0
        else:
            r_logits = self._logits(r)  # [B, Lr, V]
            retain = (losses.masked_nll(r_logits, r["labels"]) if h.regularizer == "gdr"
                      else losses.kl_retain_loss(r_logits, self._logits(r, frozen=True), r["labels"]))
        loss = h.forget_weight * forget + h.retain_weight * retain
        return loss, {"forget_loss": forget.detach(), "retain_loss": retain.detach()}, n_f, n_r

    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        opt = self.optimizers()
        loss, parts, n_f, n_r = self.compute_loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)  # also with a non-finite loss: under DDP every rank must all-reduce
        guarded_optimizer_step(self, opt, loss, h.max_grad_norm)  # clip, or skip a non-finite step
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.tokens["forget"] += n_f
        self.tokens["retain"] += n_r
        b = len(batch["forget_prompt"])
        self.log_dict({"train/loss": loss.detach(), **{f"train/{k}": v for k, v in parts.items()},
                       "train/forget_tokens": float(self.tokens["forget"]),
                       "train/retain_tokens": float(self.tokens["retain"]),
                       "train/nonfinite_skipped": float(self.nonfinite.total)},
                      batch_size=b, on_step=True, on_epoch=False)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=b, logger=False)
        return loss.detach()

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite"] = self.nonfinite.state_dict()
        checkpoint["tokens_trained"] = dict(self.tokens)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is not None:
            check_state_dict_matches(checkpoint.get("state_dict", {}), self.state_dict(),
                                     getattr(self._trainer, "ckpt_path", None))
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])
        if "tokens_trained" in checkpoint:
            self.tokens = {k: int(v) for k, v in checkpoint["tokens_trained"].items()}

    def on_fit_end(self) -> None:
        from rerule_lightning.modules.exporting import export_module

        export_module(self, final=True)
