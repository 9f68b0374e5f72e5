"""Prompt formats shared by training rollouts and evaluation (the same format in both, always).

The embedded world and base models use MUSE's raw format ``Question: ...\\nAnswer:``; the completion
starts with a space. Instruct models use their tokenizer's chat template (see :func:`format_prompt`),
without a leading bos text (every consumer prepends the bos id itself).
"""

from __future__ import annotations

from typing import Any

RAW_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str, tokenizer: Any | None = None, use_chat_template: bool = False,
                  few_shot: list[tuple[str, str]] | None = None) -> str:
    """Render one question as the model sees it.

    Args:
        question: The question text.
        tokenizer: Needed only with ``use_chat_template``.
        use_chat_template: Use the tokenizer's chat template (instruct models) instead of the raw format.
        few_shot: Optional (question, answer) demonstrations prepended in the raw format (base models).
    """
    if use_chat_template:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("use_chat_template=True needs a tokenizer that has a chat_template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        # Templates that write the bos text themselves (Llama 3: "<|begin_of_text|>") would get a second bos:
        # rollouts, evaluation and SFT all prepend the bos id to the prompt's ids.
        bos = getattr(tokenizer, "bos_token", None)
        return text[len(bos):] if bos and text.startswith(bos) else text
    shots = "".join(RAW_TEMPLATE.format(question=q) + f" {a}\n\n" for q, a in (few_shot or []))
    return shots + RAW_TEMPLATE.format(question=question)


def format_answer(answer: str, use_chat_template: bool = False) -> str:
    """The completion text for a target answer (raw format: a leading space)."""
    return answer if use_chat_template else " " + answer
