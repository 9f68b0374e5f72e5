"""Token log-probs without a full log-softmax: equal values, less memory; the lean ``sequence_logprobs``."""

from __future__ import annotations

import importlib.util
import os
import time
from types import SimpleNamespace

import pytest
import torch

from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.rollout import pack_sequences
from rerule_lightning.rl.grpo import token_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "logprob_memory.py")


def _bench():
    spec = importlib.util.spec_from_file_location("logprob_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _naive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_to_naive_log_softmax_gather(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(12, 16, 500, generator=g) * 4).to(dtype)  # [B, L, V]
    targets = torch.randint(0, 500, (12, 16), generator=g)  # [B, L]
    ours = token_logprobs(logits, targets, chunk_size=5)  # [B, L]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, _naive(logits, targets), atol=1e-5, rtol=0)


def test_temperature_is_the_same_as_dividing_first() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 7, 50, generator=g)  # [B, L, V]
    targets = torch.randint(0, 50, (6, 7), generator=g)  # [B, L]
    before = token_logprobs(logits / 0.7, targets, chunk_size=4)  # the old call: a full divided copy first
    assert torch.equal(token_logprobs(logits, targets, chunk_size=4, temperature=0.7), before)
    assert torch.equal(token_logprobs(logits, targets, temperature=1.0), token_logprobs(logits, targets))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, targets, temperature=0.0)


def test_benchmark_measures_less_memory_for_ours() -> None:
    bench = _bench()
    t = time.perf_counter()
    r = bench.compare(batch=32, length=64, vocab=8000, chunk_size=4)  # 65.5 MB of float32 logits
    assert time.perf_counter() - t < 15  # two fresh processes (about 3 s when the machine is idle)
    assert r["logits"] == 32 * 64 * 8000 * 4
    assert r["naive"] >= 0.9 * r["logits"]  # the [B, L, V] float32 log-softmax output
    assert r["ours"] < 0.5 * r["naive"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("reference", [False, True])
def test_sequence_logprobs_unchanged_by_logits_to_keep(temperature: float, reference: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    module = GRPOUnlearningModule(temperature=temperature, beta=0.1)
    module.model = LlamaForCausalLM(cfg).eval()
    module.ref_model = LlamaForCausalLM(cfg).eval() if reference else None
    module.tokenizer = SimpleNamespace(pad_token_id=0)
    prompts = [torch.tensor([1, 5, 6]), torch.tensor([1, 7]), torch.tensor([1, 8, 9, 10])]
    c_ids = torch.tensor([[11, 12, 2, 0, 0], [13, 2, 0, 0, 0], [14, 15, 16, 2, 0]])  # [N, T]
    c_mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])  # [N, T]
    with torch.no_grad():
        logp, m = module.sequence_logprobs(prompts, c_ids, c_mask, reference=reference)  # [N, T']
        # the previous implementation: every position's logits, sliced, divided by T as one tensor
        ids, attn, p = pack_sequences(prompts, c_ids, c_mask, 0)
        net = module.ref_model if reference else module.model
        logits = net(input_ids=ids, attention_mask=attn).logits  # [N, P+T', V]
        before = token_logprobs(logits[:, p - 1:-1] / temperature, ids[:, p:])  # [N, T']
    assert logp.shape == (3, 4) and torch.equal(m, c_mask[:, :4])
    # the lm head over the kept positions only is a matmul of another shape (other blocking, other float32
    # rounding) than over every position: log-probs of ~-3.7 (ulp ~2.4e-7) agree to a few ulp, not bit for bit
    torch.testing.assert_close(logp, before, atol=1e-5, rtol=0)


def _tiny_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _full_pass(model, p_ids, c_ids, c_mask, temperature: float) -> torch.Tensor:
    ids, attn, p = pack_sequences(p_ids, c_ids, c_mask, 0)
    logits = model(input_ids=ids, attention_mask=attn).logits  # [N, P+T', V]
    return token_logprobs(logits[:, p - 1:-1] / temperature, ids[:, p:])  # [N, T']


@pytest.mark.parametrize("buckets", [1, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prefix_reference_equals_the_full_pass(temperature: float, buckets: int) -> None:
    from rerule_lightning.primitives.logprobs import prompt_runs, shared_prefix_logprobs

    model = _tiny_lm(1)
    prompts = [torch.tensor([1, 5, 6]), torch.tensor([1, 7]), torch.tensor([1, 8, 9, 10, 11])]
    p_ids = [x for x in prompts for _ in range(3)]  # G = 3, the same tensor object repeated
    assert prompt_runs(p_ids) == (prompts, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 4, 2, 5, 3, 1, 2, 4, 3])  # real completion lengths (EOS included)
    c_ids = torch.randint(3, 40, (9, 7), generator=g)  # [N, T]
    c_mask = (torch.arange(7)[None, :] < lengths[:, None]).float()  # [N, T]
    c_ids = c_ids.masked_fill(c_mask == 0, 0)
    with torch.no_grad():
        expected = _full_pass(model, p_ids, c_ids, c_mask, temperature)  # [N, 5]
        logp, m = shared_prefix_logprobs(model, p_ids, c_ids, c_mask, 0, temperature,
                                         max_buckets=buckets, min_rows=2)
    assert logp.shape == (9, 5) and torch.equal(m, c_mask[:, :5])
    torch.testing.assert_close(logp * m, expected * m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("share_policy", [False, True])
def test_module_reference_pass_shares_the_prefix_and_the_policy_pass_when_asked(monkeypatch, share_policy) -> None:
    import rerule_lightning.primitives.logprobs as lp

    module = GRPOUnlearningModule(temperature=1.0, beta=0.1, share_prompt_prefix=share_policy)
    module.model, module.ref_model = _tiny_lm(0), _tiny_lm(2)
    module.tokenizer = SimpleNamespace(pad_token_id=0)
    prompts = [torch.tensor([1, 5, 6]), torch.tensor([1, 7])]
    p_ids = [x for x in prompts for _ in range(2)]
    c_ids = torch.tensor([[11, 2, 0], [12, 13, 2], [14, 2, 0], [2, 0, 0]])  # [N, T]
    c_mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])  # [N, T]
    calls = []
    real = lp.shared_prefix_logprobs
    monkeypatch.setattr(lp, "shared_prefix_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref, m = module.sequence_logprobs(p_ids, c_ids, c_mask, reference=True)
        expected = _full_pass(module.ref_model, p_ids, c_ids, c_mask, 1.0)
    assert calls == [1]
    torch.testing.assert_close(ref * m, expected * m, atol=1e-5, rtol=0)
    policy, _ = module.sequence_logprobs(p_ids, c_ids, c_mask)  # with grad: shared only with share_prompt_prefix
    assert calls == [1, 1][:1 + share_policy] and policy.requires_grad


def test_length_buckets_sort_and_split() -> None:
    from rerule_lightning.primitives.logprobs import length_buckets

    assert length_buckets([3, 1, 2, 1], max_buckets=2, min_rows=2) == [[1, 3], [2, 0]]
    assert length_buckets([3, 1, 2], max_buckets=4, min_rows=16) == [[1, 2, 0]]  # too few rows: one bucket
    assert length_buckets(list(range(64, 0, -1)), max_buckets=4, min_rows=16)[0] == list(range(63, 47, -1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_low_precision_backward_matches_autograd(temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(5, 6, 70, generator=g) * 3).to(torch.bfloat16)  # [B, L, V]
    targets = torch.randint(0, 70, (5, 6), generator=g)  # [B, L]
    weights = torch.randn(5, 6, generator=g)  # [B, L]
    ours_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours = token_logprobs(ours_in, targets, chunk_size=2, temperature=temperature)  # [B, L]
    ref = torch.log_softmax(ref_in.float() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), atol=1e-2, rtol=1e-2)
