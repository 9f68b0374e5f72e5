"""The sampling attack: k completions per item at temperature 1, top-p 1 (leak@k).

Per item ``K = max(ks)`` completions are drawn once (seeded); leak@k for ``k ≤ K`` uses the first ``k`` of them,
so leak@k never decreases with k and leak@1 is the single-sample answer accuracy. On forget items leak@k is the
share of items with at least one sample stating the fact (lower is better); on boundary items the same number
reads answer@k (higher is better). Refusal rate and answer accuracy are over all ``K`` samples of every item.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rerule_lightning.primitives.answers import answer_correct, is_refusal
from rerule_lightning.primitives.generation import sample_completions


def leak_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Share of items whose first ``k`` samples contain at least one correct one.

    Args:
        correct: Per item, the correctness of each sample in draw order (each at least ``k`` long).
        k: Samples considered per item (≥ 1).
    """
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    if not correct:
        return float("nan")
    short = [i for i, c in enumerate(correct) if len(c) < k]
    if short:
        raise ValueError(f"leak_at_k: item {short[0]} has {len(correct[short[0]])} samples, fewer than k={k}")
    return sum(any(c[:k]) for c in correct) / len(correct)


def sample_flags(completions: Sequence[Sequence[str]], values: Sequence[str],
                 refusal_fn: Callable[[str], bool] = is_refusal) -> tuple[list[list[bool]], list[list[bool]]]:
    """``(correct, refused)`` per item and sample (correct: the fact stated and not a refusal)."""
    correct = [[answer_correct(c, v, refusal_fn) for c in cs] for cs, v in zip(completions, values)]
    refused = [[refusal_fn(c) for c in cs] for cs in completions]
    return correct, refused


def sampling_metrics(correct: Sequence[Sequence[bool]], refused: Sequence[Sequence[bool]],
                     ks: Sequence[int]) -> dict[str, float]:
    """``refusal_rate`` and ``answer_accuracy`` over every sample, ``leak_at_<k>`` (leak@k) for each k."""
    flat_c = [x for c in correct for x in c]
    flat_r = [x for r in refused for x in r]
    out = {"refusal_rate": sum(flat_r) / len(flat_r) if flat_r else float("nan"),
           "answer_accuracy": sum(flat_c) / len(flat_c) if flat_c else float("nan")}
    out.update({f"leak_at_{k}": leak_at_k(correct, k) for k in ks})
    return out


def sample_items(model: Any, tokenizer: Any, items: Sequence[Mapping[str, Any]], num_samples: int, seed: int,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 256,
                 device: torch.device | str = "cpu") -> list[list[str]]:
    """``num_samples`` completions of each item's rendered ``prompt`` (seeded: the same seed gives the same ones
    on the same machine and thread count)."""
    torch.manual_seed(seed)
    prompts = [str(r["prompt"]) for r in items]
    per_call = max(1, batch_size // num_samples)
    out: list[list[str]] = []
    for i in range(0, len(prompts), per_call):
        chunk = prompts[i:i + per_call]
        *_, texts = sample_completions(model, tokenizer, chunk, num_generations=num_samples, temperature=temperature,
                                       top_p=top_p, max_new_tokens=max_new_tokens, device=device)
        out += [texts[j * num_samples:(j + 1) * num_samples] for j in range(len(chunk))]
    return out
