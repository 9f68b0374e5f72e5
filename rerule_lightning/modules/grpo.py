"""``GRPOUnlearningModule``: RULE's refusal-boundary optimisation as a Lightning module.

Objective (per rollout batch of B prompts × G completions). A step trains on the fresh sequences F it forwards
and the replayed ones R a replay callback supplied (``batch["replay"]``), with per-token losses

    fresh i ∈ F:     ℓ_it = −min(ρ_it A_i, clip(ρ_it, 1−ε_low, 1+ε_high) A_i)  [dual clip if A_i < 0]  + β·KL3_it
    replayed j ∈ R:  ℓ_jt = ℓ^off_jt + β·KL3_jt

and per-token weights w = 1 (fresh), w = ``replay_loss_weight`` (replayed), under ONE normaliser over S = F ∪ R
(:func:`rerule_lightning.rl.grpo.aggregate_parts`):

    dapo: L = Σ_{i∈S} w_i Σ_t M_it ℓ_it / N_S  (N_S = tokens of S, summed across processes / processes);
    bnpo: the same with the local N_S;  grpo: (1/|S|) Σ_{i∈S} w_i Σ_t M_it ℓ_it / Σ_t M_it;
    dr_grpo: Σ_{i∈S} w_i Σ_t M_it ℓ_it / (|S| · max_new_tokens).

A replayed token weighs ``replay_loss_weight`` fresh tokens whatever the buffer mix (two replayed groups beside
sixteen fresh ones: 2/18 of the step at equal lengths and weight 1). ρ = π_θ / π_old; A_i the group-normalised
advantage; KL3 the k3 estimator with verl's clamps (log-ratio ±20, estimate ≤ 10) against the reference (the
rejection-steered model; under (Q)LoRA the same weights with adapters disabled); ℓ^off the importance-corrected
loss of :func:`rerule_lightning.rl.grpo.off_policy_loss` against the stored behaviour log-probs. Without a replay
callback S = F = every fresh sequence: RULE, exactly.

Spending (``batch["replay_options"]["spend"]``): ``add`` trains on every supplied group besides the B fresh ones.
``fill`` gives each fresh group whose G rewards are all equal (zero advantage, no policy gradient) to the next
supplied group, in the callback's order, until either runs out. Those fresh groups are **not forwarded at all**
(no policy pass, no reference pass), so their KL term goes with them: the KL covers exactly the forwarded
sequences, and a step forwards and back-propagates at most B·G sequences. Unreplaced zero-variance groups stay
(KL only). Left-out groups reach the callback with ``behaviour_logprobs = None``: they cannot be replayed.
``outputs["replay_used"]`` lists the indices of the supplied groups the step trained on.

Micro-batching (``micro_batch_size``): the fresh and the replayed sequences are forwarded and back-propagated
``micro_batch_size`` rows at a time (reference passes too), each micro-batch's loss divided by the whole step's
normaliser, so the accumulated gradient is the single pass's (:mod:`rerule_lightning.rl.micro_batch`); statistics are
recomputed on the whole batch. Under DDP every micro-batch's backward all-reduces (correct; no ``no_sync`` yet).

μ > 1 (``num_iterations``): Lightning counts every optimizer step in ``trainer.global_step``, so ``max_steps``
optimizer steps are ``max_steps // μ`` rollout batches and ``global_step // μ`` is the rollout batch index (the
datamodule and replay callbacks count in it). The μ iterations reuse the batch's rollouts and replayed groups.

Deviations from RULE's released settings, all deliberate and configurable:

* π_old is the detached log-prob of the first forward pass of the step, not a separate pass: with one
  optimizer step per rollout batch (μ = 1, RULE's setting) it is provably equal to the behaviour policy,
  so the extra forward pass would be wasted; with μ > 1 the first pass runs before any update and is
  therefore still exactly π_old. The same tensor is stored as the groups' behaviour log-probs.
* Log-probs are computed on ``logits / temperature``, i.e. under the distribution that was sampled.
* Sampling is re-seeded from ``(seed, global_step, rank)`` every step, so an interrupted and resumed fit
  samples exactly the same completions as an uninterrupted one.

Non-finite values: a NaN / Inf loss or gradient makes the optimizer step a no-op (gradients dropped, so
parameters and AdamW state stay as they were; the step still counts towards ``max_steps``), is counted in
``train/nonfinite_skipped`` and hands no groups to a replay callback. A NaN reward is treated as non-finite
input, not repaired: it makes its group's advantages (or, with ``scale_rewards: batch``, every advantage)
NaN, hence the loss, so the whole step is skipped. After ``max_consecutive_nonfinite`` such steps in a row
the fit saves ``nonfinite_stop.ckpt`` and raises :class:`~rerule_lightning.primitives.guards.NonFiniteError`. The
counters are in the checkpoint, so a resumed fit continues them exactly.
"""

import contextlib
from typing import Any, Literal

import lightning as L
import torch

from rerule_lightning.evaluation.evaluator import UnlearningEvaluator
from rerule_lightning.modules.eval_hooks import EvaluationHooks
from rerule_lightning.modules.exporting import export_module
from rerule_lightning.modules.replay_hooks import ReplayHooks
from rerule_lightning.primitives import logprobs
from rerule_lightning.primitives.checkpointing import (
    TrainableStateMixin,
    check_state_dict_matches,
    frozen_state_keys,
)
from rerule_lightning.primitives.export import ExportConfig
from rerule_lightning.primitives.generation import check_generation_kwargs, sample_completions
from rerule_lightning.primitives.guards import NonFiniteCounter, guarded_optimizer_step
from rerule_lightning.primitives.policy import (
    PolicyConfig,
    build_policy,
    load_base_model,
    load_tokenizer,
    plain_hparams,
    reference_context,
)
from rerule_lightning.primitives.ranges import (
    Count,
    CountOrNull,
    DualClip,
    GroupSize,
    NonNegative,
    Positive,
    Unit,
    UnitAboveZero,
    UnitBelowOne,
    range_errors,
)
from rerule_lightning.primitives.rollout import (
    RolloutGroup,
    keep_groups,
    replay_slots,
)
from rerule_lightning.rl.grpo import group_advantages, grpo_loss
from rerule_lightning.rl.micro_batch import chunked_logprobs
from rerule_lightning.rl.reward_contract import (
    RewardContract,
    RewardTrainerState,
    batch_columns,
    completion_id_lists,
    per_function_metrics,
    score_rewards,
)
from rerule_lightning.rl.step import ClipSettings, micro_batched_iteration
from rerule_lightning.rl.step_log import reward_matrix, step_metrics


class GRPOUnlearningModule(TrainableStateMixin, EvaluationHooks, ReplayHooks, L.LightningModule):
    """GRPO on forget and boundary prompts with verifiable RULE rewards (manual optimization).

    Checkpoints hold the trainable weights only (:class:`~rerule_lightning.primitives.checkpointing.TrainableStateMixin`):
    never the frozen reference (full fine-tuning) nor the frozen base (under (Q)LoRA).

    Args:
        policy: The model to unlearn (the rejection-steered checkpoint) and how to train it.
        reference_path: KL reference for full fine-tuning; defaults to ``policy.name_or_path``. Ignored
            under (Q)LoRA, where the reference is the base with adapters disabled.
        num_generations: G, completions sampled per prompt.
        max_new_tokens: Longest completion sampled.
        temperature: Sampling temperature (log-probs use the same temperature).
        top_p: Nucleus sampling threshold (behaviour log-probs are those of the untruncated tempered softmax, so
            keep 1.0, RULE's setting, for exact ratios).
        generation_batch_size: Sequences per rollout ``generate`` call (whole prompts: ``// num_generations``
            prompts each, at least one); ``None`` samples the whole batch at once. Bounds the KV cache.
        stop_token_ids: Further token ids that end a completion besides the tokenizer's EOS and the model's own
            ``generation_config.eos_token_id`` (an int or a list, e.g. Llama-3.1's ``<|eot_id|>``), which are
            always used (:func:`rerule_lightning.primitives.generation.stop_ids`).
        generation_kwargs: Extra rollout ``GenerationConfig`` fields that leave the sampling distribution
            unchanged: ``cache_implementation``, ``cache_config``, ``use_cache``, ``stop_strings``; anything else
            is refused. Rollouts read only the stop ids from the model's own ``generation_config``
            (:func:`rerule_lightning.primitives.generation.sample_rollouts`).
        learning_rate: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient-norm clip (``self.clip_gradients``); 0 disables.
        num_iterations: μ, optimizer steps per rollout batch, reusing the rollouts against π_old (each one
            counts in ``trainer.global_step``).
        micro_batch_size: Sequences per forward / backward (fresh and replayed alike, policy and reference
            passes), gradients accumulated inside the one optimizer step under the whole batch's normaliser
            (:mod:`rerule_lightning.rl.micro_batch`); ``None`` forwards each part in one pass.
        beta: KL coefficient (k3 estimator, verl's clamps); 0 skips the reference pass entirely.
        epsilon_low: Lower clip range ε_low.
        epsilon_high: Upper clip range ε_high.
        dual_clip: Dual-clip constant for negative advantages (``None`` disables); also applies to replayed
            groups under the ``clipped`` correction.
        loss_type: Normaliser: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        scale_rewards: Advantage scaling: ``group``, ``batch`` or ``none``.
        reward: A reward in :data:`rerule_lightning.rl.rewards.REWARD_FUNCTIONS`, an import path
            ``package.module:function`` of a TRL reward function, called as TRL calls it:
            ``fn(prompts=, completions=, completion_ids=, trainer_state=, **columns)`` with the batch's columns
            under their own names (``id``, ``question``, ``label``, ``kind``, ``reference``, ``target``,
            ``value``), returning one float or ``None`` per completion (:mod:`rerule_lightning.rl.reward_contract`);
            or a list of them, summed with ``reward_weights`` (each logged as ``train/rewards/<name>/mean``).
            ``None`` means "not applicable": left out of the group's mean and std, advantage 0.
        reward_weights: One weight per entry of ``reward`` (default: 1 each).
        target_aware: Forget reward variant: 0.5 for refusing + 0.5 for naming the target.
        recall_threshold: Boundary reward: ROUGE-L recall needed for the second 0.5.
        eval_max_new_tokens: Greedy tokens per answer in validation / test.
        seed: Seed of the per-step sampling.
        export_dir: If set, the policy is exported there at the end of fit (and at each checkpoint of
            :class:`callbacks.ResumableCheckpoint`): :mod:`rerule_lightning.primitives.export`.
        eval_reference: Retain model directory for forget quality and privleak in validation / test (its
            statistics are computed once, lazily, and cached next to it).
        eval_report_path: Where ``test`` writes ``eval.json`` (rank zero); ``None`` writes nothing.
        max_consecutive_nonfinite: Optimizer steps in a row with a NaN / Inf loss or gradient (each one
            skipped, parameters and optimizer state untouched) after which the fit stops with
            :class:`~rerule_lightning.primitives.guards.NonFiniteError`, having saved the last good state to
            ``nonfinite_stop.ckpt`` (in the checkpoint directory, else ``trainer.default_root_dir``).
        export: How ``export_dir`` is written: ``merge`` (Q)LoRA adapters into plain weights, ``push_to_hub``
            a repository, the model card (:class:`~rerule_lightning.primitives.export.ExportConfig`).
        share_prompt_prefix: Policy pass with each prompt encoded once per group and its keys / values shared by
            the G completions, backward through the shared prompt
            (:func:`rerule_lightning.primitives.logprobs.shared_prefix_logprobs`; log-probs and gradients equal
            the full pass up to float rounding). Where the model cannot take it (gradient checkpointing, no KV
            cache) the full pass runs, named once in the log. The reference pass always shares.
    """

    def __init__(self, policy: PolicyConfig | None = None, reference_path: str | None = None,
                 num_generations: GroupSize = 8, max_new_tokens: Count = 32, temperature: Positive = 1.0,
                 top_p: UnitAboveZero = 1.0, generation_batch_size: CountOrNull = None,
                 stop_token_ids: list[int] | None = None, generation_kwargs: dict[str, Any] | None = None,
                 learning_rate: Positive = 2e-6, weight_decay: NonNegative = 0.01, max_grad_norm: NonNegative = 1.0,
                 num_iterations: Count = 1, micro_batch_size: CountOrNull = None, beta: NonNegative = 0.01,
                 epsilon_low: UnitBelowOne = 0.2, epsilon_high: NonNegative = 0.3, dual_clip: DualClip = 3.0,
                 loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
                 scale_rewards: Literal["group", "batch", "none"] = "group", reward: str | list[str] = "rule",
                 reward_weights: list[float] | None = None, target_aware: bool = False, recall_threshold: Unit = 0.3,
                 eval_max_new_tokens: Count = 32, seed: int = 0, export_dir: str | None = None,
                 eval_reference: str | None = None, eval_report_path: str | None = None,
                 max_consecutive_nonfinite: Count = 3, export: ExportConfig | None = None,
                 share_prompt_prefix: bool = True) -> None:
        super().__init__()
        errors = range_errors(type(self), locals())
        if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
            errors.append(f"loss_type={loss_type!r}: choose grpo, bnpo, dr_grpo or dapo")
        if scale_rewards not in ("group", "batch", "none"):
            errors.append(f"scale_rewards={scale_rewards!r}: choose group, batch or none")
        errors += check_generation_kwargs(generation_kwargs)
        if errors:
            raise ValueError("GRPOUnlearningModule: " + "; ".join(errors))
        try:
            self.reward_fn = RewardContract(reward, reward_weights, {"target_aware": target_aware,
                                                                     "recall_threshold": recall_threshold})
        except ValueError as e:
            raise ValueError(f"GRPOUnlearningModule: reward={reward!r}: {e}") from None
        self.save_hyperparameters(ignore=["policy", "export"])
        self.automatic_optimization = False
        self.policy_cfg = policy or PolicyConfig()
        self.export_cfg = export or ExportConfig()
        plain_hparams(self, policy=self.policy_cfg, export=self.export_cfg)
        self.model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.evaluator: UnlearningEvaluator | None = None  # created in setup() from the datamodule's eval_splits
        self.nonfinite = NonFiniteCounter(limit=max_consecutive_nonfinite)

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_cfg)
        self.model = build_policy(self.policy_cfg)
        if self.hparams.beta > 0 and self.policy_cfg.peft == "full":
            ref = load_base_model(self.hparams.reference_path or self.policy_cfg.name_or_path, self.policy_cfg)
            self.ref_model = ref.eval().requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    # -------------------------------------------------------------- rollouts
    def _sample(self, prompts: list[str]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
        """Sample G completions per prompt. Returns prompt ids, completion ids/mask ``[B*G, T]`` and texts.

        The distribution is the module's alone (a fresh ``GenerationConfig``; the model's own is ignored)."""
        h, tok = self.hparams, self.tokenizer
        torch.manual_seed(h.seed * 1_000_003 + self.global_step * 7919 + self.global_rank)
        return sample_completions(self.model, tok, prompts, num_generations=h.num_generations,
                                  temperature=h.temperature, top_p=h.top_p, max_new_tokens=h.max_new_tokens,
                                  stop_token_ids=h.stop_token_ids, generation_kwargs=h.generation_kwargs,
                                  generation_batch_size=h.generation_batch_size, device=self.device)

    def sequence_logprobs(self, prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor,
                          completion_mask: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of completions (at the sampling temperature), trimmed to the longest one.

        The LM head runs only on positions that predict completion tokens (``logits_to_keep``). A reference
        pass without gradient encodes each distinct prompt once and shares its KV cache with the prompt's G
        rows (:func:`rerule_lightning.primitives.logprobs.shared_prefix_logprobs`; equal to the full pass up to float
        rounding).

        Returns:
            ``(logp [N, T'], mask [N, T'])``.
        """
        model = self.ref_model if reference and self.ref_model is not None else self.model
        ctx = reference_context(model) if reference and self.ref_model is None else contextlib.nullcontext()
        with ctx:
            return logprobs.completion_logprobs(model, prompt_ids, completion_ids, completion_mask,
                                                self.tokenizer.pad_token_id, self.hparams.temperature,
                                                share_prefix=reference or self.hparams.share_prompt_prefix)

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        g = h.num_generations
        prompts = batch["prompt"]
        b = len(prompts)
        sampled_at = int(self.global_step)  # the groups' step: global_step before this step's update(s)
        prompt_ids, completion_ids, mask, texts = self._sample(prompts)
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
        state = RewardTrainerState(sampled_at, int(self.trainer.max_steps), float(self.current_epoch))
        raw, per_fn = score_rewards(self.reward_fn, {  # TRL's keyword call (rl/reward_contract.py)
            "prompts": rep(prompts), "completions": texts, "completion_ids": completion_id_lists(completion_ids, mask),
            "trainer_state": state, **batch_columns(batch, g)})
        rewards, applicable = reward_matrix(raw, b, g, self.device)  # [B, G] x2
        rewards_all, applicable_all = rewards, applicable
        if self.trainer.world_size > 1:
            rewards_all = self.all_gather(rewards).reshape(-1, g)  # [B_all, G]
            applicable_all = self.all_gather(applicable).reshape(-1, g)  # [B_all, G]
        advantages = group_advantages(rewards_all, h.scale_rewards, applicable=applicable_all)  # [B_all, G]
        if self.trainer.world_size > 1:
            advantages = advantages.view(self.trainer.world_size, b, g)[self.global_rank]  # [B, G]
        adv = advantages.reshape(-1)  # [B*G]
        p_ids = [x for x in prompt_ids for _ in range(g)]

        supplied: list[RolloutGroup] = list(batch.get("replay") or [])
        opts = dict(batch.get("replay_options") or {})
        match = bool(opts.get("match_labels", False))
        used, left_out = replay_slots(rewards, len(supplied), opts.get("spend", "add"),
                                      list(batch["label"]) if match else None,
                                      [grp.label for grp in supplied] if match else None)
        replay = [supplied[i] for i in used]
        kept = sorted(set(range(b)) - set(left_out))
        f_pids, f_ids, f_mask, f_adv = p_ids, completion_ids, mask, adv  # [B*G, T], [B*G, T], [B*G]
        if left_out:  # fill: the replaced zero-variance groups are not forwarded at all
            f_pids, f_ids, f_mask, f_adv = keep_groups(kept, g, p_ids, completion_ids, mask, adv)  # K*G rows

        ref_logp = None
        if h.beta > 0 and f_pids:
            with torch.no_grad():
                ref_logp, _ = chunked_logprobs(self._reference_logprobs, f_pids, f_ids, f_mask,
                                               h.micro_batch_size)  # [K*G, T']
        replayed = self.replay_inputs(replay) if replay else None
        opt = self.optimizers()
        old_logp = None
        skipped = False
        stats: dict[str, torch.Tensor] = {}
        active = f_mask.sum() if replayed is None else f_mask.sum() + replayed["completion_mask"].sum()
        if self.trainer.world_size > 1:
            active = self.all_gather(active).sum() / self.trainer.world_size
        weight = float(opts.get("weight", 1.0))
        for _ in range(h.num_iterations):
            opt.zero_grad()
            if h.micro_batch_size is not None:  # gradient accumulation over micro-batches, same loss
                loss, stats, old_logp = micro_batched_iteration(
                    (f_pids, f_ids, f_mask, f_adv), old_logp, ref_logp, replayed, opts, self._clip(),
                    self.sequence_logprobs, self.manual_backward, h.loss_type, h.micro_batch_size, h.max_new_tokens,
                    float(active))
            else:
                if f_pids:
                    logp, m = self.sequence_logprobs(f_pids, f_ids, f_mask)  # [K*G, T']
                else:  # every fresh group was replaced: only the replayed sequences are trained on
                    logp = m = torch.zeros(0, 1, device=self.device)  # [0, 1]
                if old_logp is None:
                    old_logp = logp.detach()
                extra = []
                r_stats: dict[str, torch.Tensor] = {}
                if replayed is not None:
                    r_tok, r_mask, r_stats = self.replay_loss(replayed, opts)  # [R*G, T''] x2
                    extra.append((r_tok, r_mask, weight))
                loss, stats = grpo_loss(logp, old_logp, f_adv, m, ref_logp=ref_logp, beta=h.beta,
                                        eps_low=h.epsilon_low, eps_high=h.epsilon_high, dual_clip=h.dual_clip,
                                        loss_type=h.loss_type, max_completion_length=h.max_new_tokens,
                                        num_active_tokens=float(active), extra=extra)
                stats.update(r_stats)
                self.manual_backward(loss)  # also with a non-finite loss: under DDP every rank must all-reduce
            finite = guarded_optimizer_step(self, opt, loss, h.max_grad_norm)  # clip, or skip a non-finite step
            skipped = skipped or not finite

        self.log("train/nonfinite_skipped", float(self.nonfinite.total), on_step=True, on_epoch=False, batch_size=b)
        # nothing from a skipped step reaches a replay buffer (NaN behaviour log-probs / rewards)
        groups = [] if skipped else self._groups(batch, prompt_ids, completion_ids, mask, old_logp, rewards,
                                                 advantages, texts, step=sampled_at, ref_logp=ref_logp, kept=kept)
        if supplied:
            stats["sequences_trained"] = torch.tensor(float((len(kept) + len(replay)) * g))
        self._log_step(loss, stats, rewards, mask, batch, applicable)
        if per_fn:
            self.log_dict(per_function_metrics(per_fn), batch_size=b, on_step=True, on_epoch=False)
        return {"loss": loss.detach(), "groups": groups, "replay_used": [] if skipped else used,
                "rewards_per_function": per_fn}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is not None:  # refuse another model's checkpoint before load_state_dict trips on it
            saved = checkpoint.get("state_dict", {})
            for k in frozen_state_keys(self, list(saved)):  # an older checkpoint with frozen weights: not needed
                del saved[k]
            check_state_dict_matches(saved, self.state_dict(),
                                     getattr(self._trainer, "ckpt_path", None))
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])

    def _clip(self) -> ClipSettings:
        h = self.hparams
        return ClipSettings(h.beta, h.epsilon_low, h.epsilon_high, h.dual_clip)

    def _reference_logprobs(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sequence_logprobs(*args, reference=True)

    def _log_step(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], rewards: torch.Tensor,
                  mask: torch.Tensor, batch: dict[str, Any], applicable: torch.Tensor) -> None:
        b = rewards.size(0)
        log = step_metrics(loss, stats, rewards, mask, batch["label"], batch.get("kind"), applicable)
        self.log_dict(log, batch_size=b, on_step=True, on_epoch=False)
        self.log("reward", rewards.mean(), prog_bar=True, batch_size=b, logger=False)
        if "kl" in stats:
            self.log("kl", stats["kl"], prog_bar=True, batch_size=b, logger=False)

    def on_fit_end(self) -> None:
        export_module(self, final=True)
