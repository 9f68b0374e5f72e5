"""Prompt formats shared by training rollouts and evaluation (the same format in both, always).

The embedded world and base models use MUSE's raw format ``Question: ...\\nAnswer:``; the completion
starts with a space. Instruct models use their tokenizer's chat template (see :func:`format_prompt`),
without a leading bos text (every consumer prepends the bos id itself).
"""

from __future__ import annotations

from typing import Any

import torch

#: Label of prompt and padding positions (ignored by the cross-entropy of supervised fine-tuning).
IGNORE_INDEX = -100

RAW_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str, tokenizer: Any | None = None, use_chat_template: bool = False,
                  few_shot: list[tuple[str, str]] | None = None, system_prompt: str | None = None,
                  date_string: str | None = None) -> str:
    """Render one question as the model sees it.

    Args:
        question: The question text.
        tokenizer: Needed only with ``use_chat_template``.
        use_chat_template: Use the tokenizer's chat template (instruct models) instead of the raw format.
        few_shot: Optional (question, answer) demonstrations prepended in the raw format (base models).
        system_prompt: Chat format: a system message before the question (open-unlearning's TOFU targets:
            "You are a helpful assistant.").
        date_string: Chat format: the template's ``date_string`` variable (the Llama-3.x templates write
            today's date without it; open-unlearning's TOFU targets saw "10 Apr 2025").
    """
    if use_chat_template:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("use_chat_template=True needs a tokenizer that has a chat_template")
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
            {"role": "user", "content": question}]
        extra = {"date_string": date_string} if date_string is not None else {}
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        # Templates that write the bos text themselves (Llama 3: "<|begin_of_text|>") would get a second bos:
        # rollouts, evaluation and SFT all prepend the bos id to the prompt's ids.
        bos = getattr(tokenizer, "bos_token", None)
        return text[len(bos):] if bos and text.startswith(bos) else text
    shots = "".join(RAW_TEMPLATE.format(question=q) + f" {a}\n\n" for q, a in (few_shot or []))
    return shots + RAW_TEMPLATE.format(question=question)


def format_answer(answer: str, use_chat_template: bool = False) -> str:
    """The completion text for a target answer (raw format: a leading space)."""
    return answer if use_chat_template else " " + answer


def tokenize_pair(tokenizer: Any, prompt: str, completion: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of ``bos + prompt + completion + eos`` with labels masked on the prompt.

    The prompt and completion are tokenised separately, so the prompt's ids are exactly those a rollout
    or an evaluation sees when it tokenises the prompt alone.

    Raises:
        ValueError: If the pair is longer than ``max_length`` tokens (naming the prompt).
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(c) > max_length:
        raise ValueError(f"example is {len(p) + len(c)} tokens, over max_length={max_length}: {prompt[:80]!r}")
    return {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}


def collate_right_padded(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenised pairs to the longest one."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(batch), n), dtype=torch.long)  # [B, L]
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
