"""Layer 1, model primitives: building and loading the policy (full, LoRA, QLoRA), sampling, token log-probs,
refusal detection and fact matching, ROUGE, prompt formats, rollout groups, numeric guards, safe checkpoints and
the numeric ranges that signatures carry (:mod:`.ranges`).

Nothing here imports another layer of the core."""
