"""Batched generation helpers shared by evaluation and reporting (greedy decoding, left padding), and the
rollout sampler of GRPO, whose distribution is fixed by the module's own settings alone.

Rollouts must be sampled from exactly the distribution that π_old describes (the temperature-scaled softmax of
the logits; :func:`rerule_lightning.primitives.logprobs.token_logprobs`). ``model.generate`` merges the model's saved
``generation_config`` into any unset field (a published model may set ``repetition_penalty``, ``top_k``,
``temperature``, ``suppress_tokens``...), so :func:`sample_rollouts` builds a fresh ``GenerationConfig`` from the
module's settings only and hides the model's own for the duration of the call. ``generation_kwargs`` may add
only what leaves the distribution unchanged (:data:`ROLLOUT_GENERATION_KWARGS`); :func:`check_generation_kwargs`
refuses the rest. Only the model's stop ids are kept from its config (:func:`stop_ids`): the tokenizer's EOS ∪ the
model's ``generation_config.eos_token_id`` ∪ ``stop_token_ids`` end a rollout and a greedy answer alike.

Prefill once (:func:`prefill_once_blocker`, :func:`sample_rollouts`): ``generate(num_return_sequences=G)`` expands
each prompt G times *before* its prefill, so every prompt is prefilled G times. Instead the B prompts but their last
token are prefilled once (``[B, P-1]``, positions from the attention mask as ``generate`` computes them), the cache
is repeated to ``B·G`` rows (``repeat_interleave``, the order ``generate`` expands in) and ``generate`` resumes
from it on the ``B·G`` expanded prompts, running only the last prompt token and then sampling. Sampling consumes
the RNG exactly as before (one draw per step over the same ``[B·G, V]`` probabilities; the prefill draws nothing),
so a seed gives the same completions up to float rounding of the prompt's logits (in practice: the same ones; tested).
Memory: the prefill's activations are those of B rows instead of B·G; the repeated cache is today's cache, and the
B-row cache it is copied from (1/G of it) is freed right after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: ``generation_kwargs`` a rollout accepts: how the cache is kept, and stop strings (which end a completion
#: without changing any token's probability; the end is then not an EOS the policy sampled).
ROLLOUT_GENERATION_KWARGS = ("cache_implementation", "cache_config", "use_cache", "stop_strings")


def check_generation_kwargs(kwargs: dict[str, Any] | None) -> list[str]:
    """Errors for ``generation_kwargs`` keys that would change the sampling distribution (or are unknown)."""
    bad = sorted(set(kwargs or {}) - set(ROLLOUT_GENERATION_KWARGS))
    if not bad:
        return []
    return [f"generation_kwargs.{k}: not allowed in rollouts, it may change the sampling distribution that the "
            f"behaviour log-probs (temperature-scaled softmax, top-p) assume; allowed: "
            f"{', '.join(ROLLOUT_GENERATION_KWARGS)}" for k in bad]


def rollout_generation_config(temperature: float, top_p: float, max_new_tokens: int, num_return_sequences: int,
                              eos_token_ids: list[int], pad_token_id: int,
                              generation_kwargs: dict[str, Any] | None = None) -> Any:
    """A fresh ``GenerationConfig`` from the rollout's settings only (top-k off, no penalties, no suppression)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0,
                            num_beams=1, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                            eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id,
                            **dict(generation_kwargs or {}))


def model_eos_ids(model: Any) -> list[int]:
    """The EOS ids of the model's own ``generation_config`` (an int or a list, e.g. Llama-3.1-Instruct's
    ``[128001, 128008, 128009]``: ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``), a peft wrapper's base
    model's included; ``[]`` when it names none."""
    ids: list[int] = []
    for owner in _generation_owners(model):
        eos = getattr(owner.generation_config, "eos_token_id", None)
        for i in ([eos] if isinstance(eos, int) else list(eos or [])):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def stop_ids(tokenizer: Any, model: Any = None, stop_token_ids: list[int] | None = None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS ∪ the model's ``generation_config.eos_token_id`` ∪
    ``stop_token_ids``, in that order without repeats (the first is the padding id of finished rows)."""
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [*first, *(model_eos_ids(model) if model is not None else []), *(stop_token_ids or [])]
    return list(dict.fromkeys(int(i) for i in ids))


def _generation_owners(model: Any) -> list[Any]:
    owners, seen = [], set()
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        if m is not None and hasattr(m, "generation_config") and id(m) not in seen:
            owners.append(m)
            seen.add(id(m))
    return owners


@contextlib.contextmanager
def model_generation_config_hidden(model: Any) -> Iterator[None]:
    """Replace the model's (and a peft wrapper's base model's) ``generation_config`` by the library defaults."""
    from transformers import GenerationConfig

    owners = _generation_owners(model)
    saved = [m.generation_config for m in owners]
    try:
        for m in owners:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, gc in zip(owners, saved):
            m.generation_config = gc


def prefill_once_blocker(model: Any, enc: dict[str, torch.Tensor], generation_config: Any) -> str | None:
    """Why the prompts cannot be prefilled once and the cache repeated G times (``None`` when they can)."""
    from rerule_lightning.primitives.logprobs import cache_argument

    if getattr(generation_config, "num_return_sequences", 1) in (None, 1):
        return "one completion per prompt"
    if enc["input_ids"].size(1) < 2:
        return "one-token prompts"
    if generation_config.use_cache is False or generation_config.cache_implementation is not None \
            or getattr(generation_config, "cache_config", None) is not None:
        return "a cache of generate's own choosing (use_cache / cache_implementation / cache_config)"
    if cache_argument(model) is None:
        return "the model's forward takes no KV cache"
    return None


def prefill_prompts(model: Any, enc: dict[str, torch.Tensor], repeats: int) -> Any | None:
    """The KV cache of every prompt but its last token, computed once and repeated ``repeats`` times per prompt.

    Positions are ``generate``'s (cumulative attention mask − 1, 0 on padding), so resuming ``generate`` from the
    cache computes exactly what its own prefill of the expanded prompts would. ``None`` when the model returns
    no cache."""
    ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]  # [B, P-1]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, P-1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.get("cache", None)
    cache = out.get("past_key_values", None) if cache is None else cache
    if cache is None:
        return None
    cache.batch_repeat_interleave(repeats)  # [B, H, P-1, D] -> [B*G, H, P-1, D] per layer
    return cache


def sample_rollouts(model: Any, enc: dict[str, torch.Tensor], generation_config: Any, tokenizer: Any,
                    prefill_once: bool = True) -> torch.Tensor:
    """``model.generate`` under ``generation_config`` alone (the model's own generation config hidden).

    With ``prefill_once`` (and nothing in :func:`prefill_once_blocker`'s way) each prompt is prefilled once and its
    cache repeated for its G rows (module docstring); otherwise ``generate`` expands before prefilling.

    Returns:
        ``[B*G, P+T]`` prompt and completion ids.
    """
    import copy

    from rerule_lightning.primitives.logprobs import cache_argument

    extra = {"tokenizer": tokenizer} if getattr(generation_config, "stop_strings", None) else {}
    with model_generation_config_hidden(model):
        if prefill_once and prefill_once_blocker(model, enc, generation_config) is None:
            g = int(generation_config.num_return_sequences)
            cache = prefill_prompts(model, enc, g)
            if cache is not None:
                config = copy.deepcopy(generation_config)
                config.num_return_sequences = 1
                expanded = {k: v.repeat_interleave(g, 0) for k, v in enc.items()}  # [B*G, P] each
                return model.generate(**expanded, generation_config=config, **{cache_argument(model): cache},
                                      **extra)
        return model.generate(**enc, generation_config=generation_config, **extra)


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
    eos = stop_ids(tokenizer, model)  # a chat model's end-of-turn ends an answer too
    for i in range(0, len(prompts), batch_size):
        enc = encode_prompts(tokenizer, prompts[i: i + batch_size], device)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
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


def end_at_stop_strings(completion_ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any,
                        stop_strings: list[str] | str, eos_token_ids: list[int]) -> torch.Tensor:
    """Mask out the EOS a row did not sample: a row ended by a stop string is padded (with EOS) right after it,
    and the mask, which ends at the first EOS, would count that padding as a sampled EOS.

    Generation stops at the first occurrence of a stop string, so a row whose text before its first EOS contains
    one was stopped there and that EOS is padding.

    Args:
        completion_ids: ``[N, T]`` completions, padded with an EOS id.
        mask: ``[N, T]``: 1 up to and including the first EOS.
        tokenizer: Decodes the completions.
        stop_strings: The rollout's stop strings.
        eos_token_ids: The rollout's EOS / stop ids.

    Returns:
        ``[N, T]`` mask.
    """
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    mask = mask.clone()
    lengths = mask.sum(1).long()  # [N]
    for i in range(mask.size(0)):
        k = int(lengths[i]) - 1  # the first EOS (or the last token when the row has none)
        if k < 0 or int(completion_ids[i, k]) not in eos_token_ids:
            continue
        if any(s in tokenizer.decode(completion_ids[i, :k], skip_special_tokens=False) for s in stops):
            mask[i, k] = 0.0
    return mask


def sample_completions(model: Any, tokenizer: Any, prompts: list[str], *, num_generations: int, temperature: float,
                       top_p: float, max_new_tokens: int, stop_token_ids: list[int] | None = None,
                       generation_kwargs: dict[str, Any] | None = None, generation_batch_size: int | None = None,
                       device: torch.device | str = "cpu", prefill_once: bool = True) -> tuple[
                           list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    """G sampled completions per prompt under :func:`rollout_generation_config` alone (GRPO's rollout).

    Args:
        model: The policy (put in eval mode for the call, its mode restored after).
        tokenizer: Its tokenizer (left padding).
        prompts: B prompt strings.
        num_generations: G.
        temperature: Sampling temperature.
        top_p: Nucleus threshold.
        max_new_tokens: Longest completion.
        stop_token_ids: Stop ids besides the tokenizer's EOS and the model's ``generation_config.eos_token_id``
            (:func:`stop_ids`).
        generation_kwargs: Distribution-neutral extras (:data:`ROLLOUT_GENERATION_KWARGS`).
        generation_batch_size: Sequences per ``generate`` call (whole prompts, at least one); ``None``: all.
        device: Where the prompts go.
        prefill_once: Prefill each prompt once and repeat its cache G times (:func:`sample_rollouts`).

    Returns:
        ``(prompt_ids, completion_ids [B*G, T], mask [B*G, T], texts)``: B prompt id tensors ``[P_i]`` (no
        padding), completions padded with the pad id after their first stop id (which the mask includes, unless a
        stop string ended the row), and the decoded completions.
    """
    from rerule_lightning.primitives.rollout import completion_mask_from_ids

    eos = stop_ids(tokenizer, model, stop_token_ids)  # read before generate hides the model's own config
    config = rollout_generation_config(temperature, top_p, max_new_tokens, num_generations, eos,
                                       pad_token_id=eos[0], generation_kwargs=generation_kwargs)
    per_call = len(prompts) if generation_batch_size is None else max(generation_batch_size // num_generations, 1)
    was_training = model.training
    model.eval()
    chunks, prompt_ids = [], []
    for i in range(0, len(prompts), per_call):
        enc = encode_prompts(tokenizer, prompts[i: i + per_call], device)
        with torch.inference_mode():
            out = sample_rollouts(model, enc, config, tokenizer, prefill_once)  # [b*G, P+T], finished rows padded with eos[0]
        chunks.append(out[:, enc["input_ids"].size(1):].clone())  # [b*G, T] (clone leaves inference mode)
        prompt_ids += [row[m.bool()].clone() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    model.train(was_training)
    width = max(max(c.size(1) for c in chunks), 1)
    completion_ids = torch.cat([torch.nn.functional.pad(c, (0, width - c.size(1)), value=eos[0])
                                for c in chunks])  # [B*G, T]
    mask = completion_mask_from_ids(completion_ids, eos)  # [B*G, T]
    stops = (generation_kwargs or {}).get("stop_strings")
    if stops:
        mask = end_at_stop_strings(completion_ids, mask, tokenizer, stops, eos)  # [B*G, T]
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)  # [B*G, T]
    texts = [t.strip() for t in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
    return prompt_ids, completion_ids, mask, texts
