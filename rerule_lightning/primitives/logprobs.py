"""Per-token log-probs: the chunked, upcast-per-chunk :func:`token_logprobs`, and completion log-probs with each
distinct prompt encoded once (the reference pass of a GRPO step without gradient, and its policy pass with it).

A GRPO step scores G completions of every prompt. Each distinct prompt is run once (``[U, P]``), its KV cache is
selected for its G rows, and only the completion tokens (``[N, T']``) are run on top of it. Positions, padding and
masks are those of the full left-padded pass (:func:`rerule_lightning.primitives.rollout.pack_sequences`), so the
values equal the full pass up to float rounding; the work drops by roughly ``(G − 1) / G`` of the prompt tokens,
and by the padding that length-sorted buckets of completions avoid.

With gradient (the policy pass) the prompt's keys / values stay in the graph: each row's copy is an
``index_select`` of its prompt's ``[U, H, P, D]`` tensors (a copy per layer and bucket, ``[n, H, P, D]``; the
cache's own ``torch.cat`` with the completion's keys / values copies once more, as it does in any cached pass), so
backward sums every row's gradient into its prompt's single forward (``index_add``) and through the prompt's layers
once. Views would not survive the cache's concatenation, so nothing is gained by them. Where the model cannot take
it with gradient (no cache / ``logits_to_keep`` argument; gradient checkpointing: a recomputed layer would append
to the cache twice; active dropout: the G rows would share one mask over their prompt; a model that returns no
cache) :func:`completion_logprobs` runs the full pass and says so once in the log.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from torch import Tensor

from rerule_lightning.primitives.rollout import pack_sequences

log = logging.getLogger(__name__)
_FALLBACKS_LOGGED: set[str] = set()


class _UpcastLogprob(torch.autograd.Function):
    """log p(target) of one low-precision chunk, upcast inside; saves the chunk itself (a view of the logits)
    and the ``[b, L]`` logsumexp for backward, and recomputes the upcast there, so no float32 ``[b, L, V]``
    copy outlives the chunk's forward."""

    @staticmethod
    def forward(ctx: object, chunk: Tensor, tgt: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
        x = chunk.to(dtype)  # [b, L, V]
        if temperature != 1.0:
            x = x / temperature  # [b, L, V]
        lse = torch.logsumexp(x, dim=-1)  # [b, L]
        ctx.save_for_backward(chunk, tgt, lse)
        ctx.temperature, ctx.dtype = temperature, dtype
        return x.gather(-1, tgt).squeeze(-1) - lse  # [b, L]

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None, None, None]:
        chunk, tgt, lse = ctx.saved_tensors
        x = chunk.to(ctx.dtype)  # [b, L, V]
        if ctx.temperature != 1.0:
            x = x / ctx.temperature  # [b, L, V]
        g = grad.unsqueeze(-1)  # [b, L, 1]
        dx = torch.exp(x - lse.unsqueeze(-1)).mul_(-g)  # [b, L, V]: −softmax · g
        dx.scatter_add_(-1, tgt, g)  # + g at the target
        if ctx.temperature != 1.0:
            dx.div_(ctx.temperature)
        return dx.to(chunk.dtype), None, None, None


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 8, temperature: float = 1.0) -> Tensor:
    """Log-probability of each target token, without a full-precision ``[B, L, V]`` log-softmax.

    log p(y_t) = logit[y_t] − logsumexp(logits_t), computed over chunks of ``chunk_size`` sequences, each
    upcast to (at least) float32 on its own, so peak extra memory is one chunk's float32 logits. For
    low-precision logits that require grad, a custom backward recomputes each chunk's upcast instead of
    keeping it (autograd's logsumexp would keep every chunk's float32 copy until backward).

    Args:
        logits: ``[B, L, V]`` logits (any float dtype; bf16/fp16 are upcast per chunk).
        targets: ``[B, L]`` token ids (already shifted to align with ``logits``).
        chunk_size: Sequences per chunk (>= 1).
        temperature: Log-probs of ``logits / temperature``, divided per upcast chunk (never a full-size
            copy of ``logits``); 1.0 divides nothing.

    Returns:
        ``[B, L]`` log-probabilities in float32 (float64 for float64 logits); differentiable.

    Raises:
        ValueError: On a non-positive ``chunk_size`` or ``temperature``, or mismatched shapes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits [B, L, V] and targets [B, L] disagree: {tuple(logits.shape)} vs "
                         f"{tuple(targets.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = []
    for start in range(0, logits.size(0), chunk_size):
        if logits.dtype != dtype and logits.requires_grad:  # keep no float32 upcast alive for backward
            tgt = targets[start:start + chunk_size].unsqueeze(-1)  # [b, L, 1]
            out.append(_UpcastLogprob.apply(logits[start:start + chunk_size], tgt, temperature, dtype))  # [b, L]
            continue
        chunk = logits[start:start + chunk_size].to(dtype)  # [b, L, V] (a view when already float32)
        if temperature != 1.0:
            chunk = chunk / temperature  # [b, L, V]
        tgt = targets[start:start + chunk_size].unsqueeze(-1)  # [b, L, 1]
        picked = chunk.gather(-1, tgt).squeeze(-1)  # [b, L]
        out.append(picked - torch.logsumexp(chunk, dim=-1))  # [b, L]
    if not out:
        return logits.new_zeros(targets.shape, dtype=dtype)  # [0, L]
    return torch.cat(out, dim=0)  # [B, L]


def prompt_runs(prompt_ids: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Distinct prompts and each row's prompt index; rows share a prompt when they hold the *same* tensor
    object in consecutive positions (as the GRPO step's ``[x for x in prompts for _ in range(G)]`` does)."""
    uniq: list[Tensor] = []
    index: list[int] = []
    for x in prompt_ids:
        if not uniq or x is not uniq[-1]:
            uniq.append(x)
        index.append(len(uniq) - 1)
    return uniq, index


def forward_parameters(model: Any) -> set[str]:
    """Argument names of the causal LM's ``forward`` (unwrapping a PEFT model; empty when not inspectable)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the LM
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the LM takes ``logits_to_keep`` (then the LM head runs only on the positions asked for)."""
    return "logits_to_keep" in forward_parameters(model)


def cache_argument(model: Any) -> str | None:
    """Name of the KV-cache argument of ``model``'s forward (``cache`` from transformers 5.2x on,
    ``past_key_values`` before), or ``None`` when it also lacks ``logits_to_keep``."""
    params = forward_parameters(model)
    if "logits_to_keep" not in params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def supports_prefix_cache(model: Any) -> bool:
    """Whether ``model`` (or the model a PEFT wrapper holds) takes a KV cache and ``logits_to_keep``."""
    return cache_argument(model) is not None


def length_buckets(lengths: list[int], max_buckets: int = 4, min_rows: int = 16) -> list[list[int]]:
    """Rows sorted by length and split into up to ``max_buckets`` equal parts of at least ``min_rows`` rows,
    so that each part can be trimmed to its own longest row."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    k = max(1, min(max_buckets, len(order) // max(min_rows, 1)))
    size = -(-len(order) // k)
    return [order[i:i + size] for i in range(0, len(order), size)]


def prefix_share_blocker(model: Any) -> str | None:
    """Why ``model`` cannot take the shared-prefix pass *with gradient* (``None`` when it can)."""
    if not supports_prefix_cache(model):
        return f"{type(model).__name__}.forward takes no KV cache with logits_to_keep"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dropout = model.training and float(getattr(getattr(base, "config", None), "attention_dropout", 0.0) or 0.0) > 0
    for m in model.modules():  # one pass (transformers' is_activation_checkpointing walks the modules too)
        if getattr(m, "gradient_checkpointing", False) is True:
            return "gradient checkpointing is on (a recomputed layer would append to the shared cache twice)"
        dropout = dropout or (model.training and isinstance(m, torch.nn.Dropout) and m.p > 0)
    if dropout:
        return "dropout is active (the G rows would share one dropout mask over their prompt)"
    return None


def log_fallback_once(reason: str) -> None:
    """Name, once per process and reason, why the policy pass runs the full (unshared) pass."""
    if reason not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(reason)
        log.warning("shared-prefix policy pass off, running the full pass: %s", reason)


def select_cache_rows(cache: Any, index: Tensor) -> Any:
    """A cache holding rows ``index`` of ``cache`` (``[U, ...] -> [n, ...]`` per layer), ``cache`` left intact.

    The layers are shallow-copied and re-pointed at ``keys[index]`` / ``values[index]`` (differentiable: the
    gradient of every row flows back to its prompt's keys / values); a cache without ``layers`` (older
    transformers) is deep-copied, which only works without gradient."""
    if hasattr(cache, "layers"):
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        new = copy.deepcopy(cache)
    new.batch_select_indices(index)
    return new


def shared_prefix_logprobs(model: Any, prompt_ids: list[Tensor], completion_ids: Tensor, completion_mask: Tensor,
                           pad_id: int, temperature: float = 1.0, max_buckets: int = 4,
                           min_rows: int = 16) -> tuple[Tensor, Tensor] | None:
    """Per-token log-probs of completions, each distinct prompt's KV cache computed once and shared.

    Differentiable when grad is enabled (module docstring: what is copied, how backward flows). The completions run in up to ``max_buckets`` length-sorted buckets, each trimmed to its longest
    completion, so short refusals do not pay for the longest answer's padding.

    Args:
        model: A causal LM (see :func:`supports_prefix_cache`), already in its context (adapters off for a
            (Q)LoRA reference).
        prompt_ids: N tensors ``[P_i]`` (repeated objects for rows that share a prompt).
        completion_ids: ``[N, T]`` right-padded completions.
        completion_mask: ``[N, T]``.
        pad_id: Padding id of the left-padded prompts.
        temperature: Log-probs of ``logits / temperature``.
        max_buckets: Most length buckets of the completion pass (1 = one pass).
        min_rows: Fewest rows per bucket.

    Returns:
        ``(logp [N, T'], mask [N, T'])`` with ``T'`` the longest real completion, as ``sequence_logprobs``;
        ``logp`` is 0 on padding beyond a row's bucket length. ``None`` when the model returns no cache (the
        caller then runs the full pass).
    """
    uniq, rows = prompt_runs(prompt_ids)
    dev = completion_ids.device
    index = torch.tensor(rows, device=dev)  # [N]
    lengths = completion_mask.sum(1).long().tolist() if completion_mask.numel() else [0] * len(rows)
    t = max(max(lengths, default=0), 1)
    ids_c, mask_c = completion_ids[:, :t], completion_mask[:, :t]  # [N, T'], [N, T']
    p = max(int(x.numel()) for x in uniq)
    ids_p = torch.full((len(uniq), p), pad_id, dtype=torch.long, device=dev)  # [U, P]
    mask_p = torch.zeros((len(uniq), p), dtype=torch.long, device=dev)  # [U, P]
    for i, x in enumerate(uniq):
        ids_p[i, p - x.numel():] = x
        mask_p[i, p - x.numel():] = 1
    out = model(input_ids=ids_p, attention_mask=mask_p, use_cache=True, logits_to_keep=1)
    prompt_cache = out.get("cache", None)
    prompt_cache = out.get("past_key_values", None) if prompt_cache is None else prompt_cache
    if prompt_cache is None:  # the model declined to cache (transformers < 5 under checkpointing in train mode)
        return None
    dtype = torch.promote_types(out.logits.dtype, torch.float32)
    first = token_logprobs(out.logits[:, -1:][index], ids_c[:, :1], temperature=temperature)  # [N, 1]
    rest = torch.zeros((ids_c.size(0), t - 1), dtype=dtype, device=dev)  # [N, T'-1]
    name = cache_argument(model)
    for bucket in length_buckets(lengths, max_buckets, min_rows):
        tb = max(max(lengths[i] for i in bucket), 1)
        if tb < 2:
            continue  # only the first token, already scored from the prompt pass
        r = torch.tensor(bucket, device=dev)  # [n]
        cache = select_cache_rows(prompt_cache, index[r])  # [U, H, P, D] -> [n, H, P, D] per layer
        attn = torch.cat([mask_p[index[r]], mask_c[r, :tb].long()], 1)  # [n, P+tb]
        logits = model(input_ids=ids_c[r, :tb], attention_mask=attn, use_cache=True, logits_to_keep=tb,
                       **{name: cache}).logits  # [n, tb, V]: position P+j predicts completion token j+1
        part = token_logprobs(logits[:, :-1], ids_c[r, 1:tb], temperature=temperature)  # [n, tb-1]
        rest = rest.index_put((r,), torch.nn.functional.pad(part, (0, t - tb)))  # [N, T'-1], out of place
    return torch.cat([first, rest], 1), mask_c  # [N, T'], [N, T']


def completion_logprobs(model: Any, prompt_ids: list[Tensor], completion_ids: Tensor, completion_mask: Tensor,
                        pad_id: int, temperature: float = 1.0, share_prefix: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of completions under ``model`` (at the sampling temperature), trimmed to the longest.

    With ``share_prefix``, when rows share prompts and the model caches, each distinct prompt is encoded once
    (:func:`shared_prefix_logprobs`; equal to the full pass up to float rounding, gradients included: the
    reference and the policy passes of a GRPO step); otherwise one left-padded
    pass over prompt + completion, the LM head only on the positions that predict completion tokens
    (``logits_to_keep``) where the model accepts it. The caller enters the model's context (e.g. adapters
    disabled for a (Q)LoRA reference) around the call.

    Args:
        model: A causal LM.
        prompt_ids: N tensors ``[P_i]`` (the same object repeated for rows that share a prompt).
        completion_ids: ``[N, T]`` right-padded completions.
        completion_mask: ``[N, T]``.
        pad_id: Padding id of the left-padded prompts.
        temperature: Log-probs of ``logits / temperature``.
        share_prefix: Whether the pass may share each prompt's KV cache across its rows (with gradient only where
            :func:`prefix_share_blocker` finds nothing in the way; the full pass otherwise, named once in the log).

    Returns:
        ``(logp [N, T'], mask [N, T'])``.
    """
    if share_prefix and len(prompt_runs(prompt_ids)[0]) < len(prompt_ids):
        blocker = prefix_share_blocker(model) if torch.is_grad_enabled() else (
            None if supports_prefix_cache(model) else "no cache")
        shared = None
        if blocker is None:
            shared = shared_prefix_logprobs(model, prompt_ids, completion_ids, completion_mask, pad_id, temperature)
            if shared is None:
                blocker = f"{type(model).__name__} returned no KV cache"
        if shared is not None:
            return shared
        if torch.is_grad_enabled():
            log_fallback_once(blocker)
    input_ids, attn, p = pack_sequences(prompt_ids, completion_ids, completion_mask, pad_id)
    t = input_ids.size(1) - p
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attn}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = t + 1  # lm_head only on the positions that predict completion tokens
    logits = model(**kwargs).logits  # [N, T'+1, V] (or [N, P+T', V] without logits_to_keep)
    logits = logits[:, -(t + 1): -1]  # [N, T', V], a view: the temperature is applied per chunk
    logp = token_logprobs(logits, input_ids[:, p:], temperature=temperature)  # [N, T']
    return logp, completion_mask[:, :t]  # [N, T'], [N, T']
