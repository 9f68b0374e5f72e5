"""The relearning attack: a few fine-tuning steps on one half of the forget targets' question → true answer
pairs, then the other half's questions (Hu et al. 2024; Łucki et al. 2024).

Knowledge that was only suppressed comes back on the *held-out* half; knowledge that is gone does not (the
retain model, which never saw the forget facts, is the control: relearning it can only teach the trained half).
The loop is plain PyTorch on purpose: a handful of AdamW steps at a constant learning rate, batches drawn
without replacement in seeded passes (:func:`batch_indices`), evaluation after each requested step count.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rerule_lightning.primitives.prompting import collate_right_padded, format_answer, tokenize_pair


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Row indices of the batch at ``step`` (0-based): consecutive draws from passes over ``range(n)``, each pass
    a fresh permutation seeded by ``seed + pass``, so every row is seen once per pass."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"batch_indices: n={n} and batch_size={batch_size} must be >= 1")
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        pass_id, idx = divmod(k, n)
        perm = list(range(n))
        random.Random(seed + pass_id).shuffle(perm)
        out.append(perm[idx])
    return out


def relearn_curve(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                  evaluate: Callable[[torch.nn.Module], Mapping[str, float]], steps: Sequence[int],
                  learning_rate: float, batch_size: int, seed: int = 0, use_chat_template: bool = False,
                  max_length: int = 512, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                  progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """Fine-tune ``model`` on ``pairs`` and evaluate it at step 0 and after each step count in ``steps``.

    Args:
        model: A trainable causal LM (full weights or a peft model with trainable adapters); changed in place.
        tokenizer: Its tokenizer (bos / eos / pad).
        pairs: ``(rendered prompt, answer)`` training pairs (the trained half).
        evaluate: Called with the model (in eval mode) at each checkpoint; returns ``{"split/metric": value}``.
        steps: Increasing optimizer step counts at which to evaluate (cumulative: 5, 10, 25 is 25 steps in all).
        learning_rate: Constant AdamW learning rate.
        batch_size: Pairs per step.
        seed: Batch order seed.
        use_chat_template: Answers formatted for a chat template (no leading space).
        max_length: Longest tokenised pair.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient-norm clip (0 disables).
        progress: Called with the step number after each optimizer step.

    Returns:
        ``{str(k): metrics}`` for ``k = 0`` and each of ``steps``.
    """
    if not pairs:
        raise ValueError("relearning needs at least one training pair")
    if list(steps) != sorted(set(steps)) or not steps or steps[0] < 1:
        raise ValueError(f"relearning.steps={list(steps)}: must be increasing positive step counts")
    device = next(model.parameters()).device
    data = [tokenize_pair(tokenizer, p, format_answer(a, use_chat_template), max_length) for p, a in pairs]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("relearning: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)

    def score() -> dict[str, float]:
        model.eval()
        out = dict(evaluate(model))
        model.train()
        return out

    curve = {"0": score()}
    model.train()
    done = 0
    for k in steps:
        while done < k:
            batch = collate_right_padded([data[i] for i in batch_indices(len(data), done, batch_size, seed)],
                                         tokenizer.pad_token_id)
            batch = {key: v.to(device) for key, v in batch.items()}
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss  # mean NLL over answer tokens of the batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            done += 1
            if progress is not None:
                progress(done)
        curve[str(k)] = score()
    return curve
