"""Batched generation helpers shared by evaluation and reporting (greedy decoding, left padding)."""

from __future__ import annotations

from typing import Any

import torch


def encode_prompts(tokenizer: Any, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded ``bos + prompt`` ids, exactly as SFT tokenised the prompt part."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids], dtype=torch.long)  # [B, P]
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)  # [B, P]
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@torch.inference_mode()
def greedy_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 32,
                    batch_size: int = 64) -> list[str]:
    """Greedy completions (text after the prompt, special tokens stripped) for every prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = encode_prompts(tokenizer, prompts[i: i + batch_size], device)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].size(1):]  # [B, T]
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    if was_training:
        model.train()
    return out


def cut_at_stop(text: str, stop: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` up to the first occurrence of any stop string, stripped (unchanged without stops).

    Greedy decoding is deterministic, so cutting the finished completion equals stopping generation there.
    """
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()
