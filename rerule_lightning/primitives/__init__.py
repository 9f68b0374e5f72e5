"""Layer 1, model primitives: building and loading the policy (full, LoRA, QLoRA), sampling, token log-probs,
refusal detection and fact matching, ROUGE, prompt formats, rollout groups, numeric guards and safe checkpoints.

Nothing here imports another layer of the core."""
