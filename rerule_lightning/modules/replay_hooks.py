"""The replay side of :class:`~rerule_lightning.modules.grpo.GRPOUnlearningModule` (a mixin, as
:class:`~rerule_lightning.modules.eval_hooks.EvaluationHooks` is its evaluation side).

The contract with a replay callback (:mod:`rerule_lightning.primitives.rollout`): the step hands its fresh groups
to the callback (:meth:`ReplayHooks._groups`, ``outputs["groups"]``) and trains on the stored groups the
callback placed in ``batch["replay"]``: :meth:`ReplayHooks.replay_inputs` stacks them once per step,
:meth:`ReplayHooks.replay_loss` gives their per-token off-policy loss under the current policy
(:func:`rerule_lightning.rl.step.replay_token_loss`), reduced by the step with the fresh tokens.
"""

from typing import Any

import torch

from rerule_lightning.primitives.rollout import RolloutGroup, split_groups, stack_groups
from rerule_lightning.rl.micro_batch import chunked_logprobs
from rerule_lightning.rl.step import replay_token_loss


class ReplayHooks:
    """Stacking, loss and hand-over of replayed groups; needs the module's ``hparams`` (``beta``,
    ``micro_batch_size``), ``tokenizer``, ``device``, ``sequence_logprobs``, ``_reference_logprobs`` and
    ``_clip``."""

    def replay_inputs(self, replay: list[RolloutGroup]) -> dict[str, Any]:
        """Everything the replayed loss needs that does not change across the μ iterations of a step.

        Pads the stored groups to one length. With β > 0 their reference log-probs are the ones stored at
        sampling time (the reference is frozen), or computed once here for groups stored without them.

        Args:
            replay: Groups placed in ``batch["replay"]`` by a replay callback, ``advantages`` set.
        """
        inputs = stack_groups(replay, self.tokenizer.pad_token_id, self.device)
        if self.hparams.beta == 0:
            inputs["ref_logprobs"] = None
        elif inputs["ref_logprobs"] is None:  # some group was stored without them: one reference pass here
            with torch.no_grad():
                inputs["ref_logprobs"], _ = chunked_logprobs(
                    self._reference_logprobs, inputs["prompt_ids"], inputs["completion_ids"],
                    inputs["completion_mask"], self.hparams.micro_batch_size)
        return inputs

    def replay_loss(self, inputs: dict[str, Any],
                    opts: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token off-policy loss of replayed groups (their stored completions, behaviour log-probs, advantages).

        Not aggregated: ``training_step`` reduces it together with the fresh tokens under one normaliser, each
        replayed token weighted by ``opts["weight"]`` (:mod:`rerule_lightning.modules.grpo`).

        Args:
            inputs: :meth:`replay_inputs` of the groups in ``batch["replay"]``.
            opts: ``batch["replay_options"]``: ``correction`` (truncated / clipped / none), ``level``
                (token / sequence), ``cap`` (c̄); ``clipped`` uses the module's ε and dual clip.

        Returns:
            ``(per_token [R*G, T'], mask [R*G, T'], stats)``: ℓ^off + β·KL3 per token; stats ``replay/*``
            (IS weight mean / max, truncated fraction, ESS, KL).
        """
        logp, m = self.sequence_logprobs(inputs["prompt_ids"], inputs["completion_ids"],
                                         inputs["completion_mask"])  # [R*G, T']
        per_tok, stats = replay_token_loss(logp, m, inputs, slice(None), opts, self._clip())
        return per_tok, m, stats

    def _groups(self, batch: dict[str, Any], prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor,
                mask: torch.Tensor, logp: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor,
                texts: list[str], step: int, ref_logp: torch.Tensor | None = None,
                kept: list[int] | None = None) -> list[RolloutGroup]:
        """The step's fresh groups for the replay contract (:func:`rerule_lightning.primitives.rollout.split_groups`)."""
        return split_groups(batch, prompt_ids, completion_ids, mask, rewards, advantages, texts, step, logp,
                            ref_logp, kept)
