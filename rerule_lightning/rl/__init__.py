"""Layer 2, the RL algorithm: group advantages and the GRPO / off-policy losses (:mod:`.grpo`), gradient
accumulation under the whole-batch normaliser (:mod:`.micro_batch`), the per-token losses and the micro-batched
iteration of one step (:mod:`.step`) and the verifiable rewards (:mod:`.rewards`).

Imports only :mod:`rerule_lightning.primitives`; a sibling of :mod:`rerule_lightning.unlearning` and
:mod:`rerule_lightning.evaluation`, which it never imports."""
