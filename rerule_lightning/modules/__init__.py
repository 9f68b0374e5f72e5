"""Layer 3, the LightningModules: :class:`~.sft.SFTModule` (target training and rejection steering),
:class:`~.grpo.GRPOUnlearningModule` (RULE / ReRULE), :class:`~.loss.LossUnlearningModule` (the baselines),
:class:`~.eval.EvalModule` (evaluation only), the evaluation hooks they share (:mod:`.eval_hooks`) and the GRPO
module's replay side (:mod:`.replay_hooks`).

Thin Lightning glue over the layers below; they never import the command layer."""
