"""``EvalModule``: evaluate a saved model (target, retain, rejection-steered, RULE, ...) without training.

    rerule test --config configs/embedded/eval.yaml --model.init_args.policy.name_or_path PATH

Validation and test share the evaluation steps of :mod:`rerule_lightning.modules.eval_hooks` with
:class:`rerule_lightning.modules.grpo.GRPOUnlearningModule`.
"""

from typing import Any

import lightning as L
import torch

from rerule_lightning.evaluation.evaluator import UnlearningEvaluator
from rerule_lightning.modules.eval_hooks import EvaluationHooks
from rerule_lightning.primitives.policy import PolicyConfig, load_base_model, load_tokenizer, plain_hparams
from rerule_lightning.primitives.ranges import Count, range_errors


class EvalModule(EvaluationHooks, L.LightningModule):
    """Evaluation only: loads ``policy.name_or_path`` frozen and computes the unlearning metrics per split.

    Args:
        policy: The model to evaluate (``peft`` is ignored: a saved adapter directory loads with its base).
        eval_reference: Retain model directory; its forget truth ratios and Min-K% AUC (computed once,
            cached next to it) give forget quality and privleak.
        eval_report_path: Where ``test`` writes ``eval.json`` (rank zero); ``None`` writes nothing.
        eval_max_new_tokens: Greedy tokens per answer.
    """

    def __init__(self, policy: PolicyConfig | None = None, eval_reference: str | None = None,
                 eval_report_path: str | None = None, eval_max_new_tokens: Count = 32) -> None:
        super().__init__()
        if errors := range_errors(type(self), locals()):
            raise ValueError("EvalModule: " + "; ".join(errors))
        self.save_hyperparameters(ignore=["policy"])
        self.policy_cfg = policy or PolicyConfig()
        plain_hparams(self, policy=self.policy_cfg)
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.evaluator: UnlearningEvaluator | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_cfg)
        self.model = load_base_model(self.policy_cfg.name_or_path, self.policy_cfg).eval().requires_grad_(False)
