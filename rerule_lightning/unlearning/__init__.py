"""Loss-based unlearning baselines as pure functions: GA, GradDiff, NPO, SimNPO, (Idk)DPO, RMU and the retain
regularisers GDR / KLR (:mod:`rerule_lightning.unlearning.losses`). The Lightning glue that trains with them is
:class:`rerule_lightning.modules.loss.LossUnlearningModule`."""

from __future__ import annotations

from rerule_lightning.unlearning.losses import (
    answer_positions,
    answer_token_logprobs,
    dpo_loss,
    ga_loss,
    graddiff_loss,
    idk_dpo_loss,
    kl_retain_loss,
    masked_nll,
    npo_loss,
    rmu_activation_mse,
    rmu_control_vector,
    rmu_forget_loss,
    rmu_retain_loss,
    sequence_logprob,
    simnpo_loss,
)

__all__ = ["answer_positions", "answer_token_logprobs", "dpo_loss", "ga_loss", "graddiff_loss", "idk_dpo_loss",
           "kl_retain_loss", "masked_nll", "npo_loss", "rmu_activation_mse", "rmu_control_vector", "rmu_forget_loss",
           "rmu_retain_loss", "sequence_logprob", "simnpo_loss"]
