"""Prefill once in rollouts: the B prompts prefilled once and their cache repeated G times gives, seed for seed,
exactly the completions of ``generate(num_return_sequences=G)``, which prefills every prompt G times."""

from __future__ import annotations

import pytest
import torch

from rerule_lightning.primitives import generation as gen
from rerule_lightning.primitives.policy import PolicyConfig, build_policy, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Question: Where was Orla Venn born?\nAnswer:", "Who founded Kest?", "Question: What does the"
           " guild of Marrow Hill trade in, and since when?\nAnswer:", "Hi"]  # uneven: left padding


def _sample(model, tok, prefill_once: bool, seed: int, **kw) -> tuple:
    torch.manual_seed(seed)
    return gen.sample_completions(model, tok, PROMPTS, num_generations=8, temperature=kw.pop("temperature", 2.0),
                                  top_p=1.0, max_new_tokens=12, prefill_once=prefill_once, **kw)


@pytest.mark.parametrize("threads, kw", [(1, {}), (2, {}), (1, {"generation_batch_size": 16, "temperature": 1.0}),
                                        (1, {"generation_kwargs": {"stop_strings": ["."]}})])
def test_prefill_once_samples_the_same_completions(tiny_prepared: dict, monkeypatch: pytest.MonkeyPatch,
                                                   threads: int, kw: dict) -> None:
    torch.set_num_threads(threads)  # one_torch_thread restores the count
    cfg = PolicyConfig(name_or_path=tiny_prepared["links"]["target"])
    model, tok = build_policy(cfg), load_tokenizer(cfg)
    calls: list[tuple[int, int]] = []
    real = gen.prefill_prompts
    monkeypatch.setattr(gen, "prefill_prompts",
                        lambda m, enc, g: calls.append((enc["input_ids"].size(0), g)) or real(m, enc, g))
    for seed in (0, 1):
        before = _sample(model, tok, False, seed, **dict(kw))
        assert not calls
        after = _sample(model, tok, True, seed, **dict(kw))
        per_call = len(PROMPTS) if "generation_batch_size" not in kw else 2
        assert calls == [(per_call, 8)] * (len(PROMPTS) // per_call)
        calls.clear()
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
        assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
        assert before[3] == after[3]
    assert len(set(after[3])) > 8, "temperature 2 should sample varied completions"
    assert model.training, "the model's mode is restored"


def test_prefill_once_blocked_where_generate_chooses_the_cache(tiny_prepared: dict) -> None:
    cfg = PolicyConfig(name_or_path=tiny_prepared["links"]["target"])
    model, tok = build_policy(cfg), load_tokenizer(cfg)
    enc = gen.encode_prompts(tok, PROMPTS)
    config = gen.rollout_generation_config(1.0, 1.0, 4, 8, [tok.eos_token_id], tok.eos_token_id)
    assert gen.prefill_once_blocker(model, enc, config) is None
    static = gen.rollout_generation_config(1.0, 1.0, 4, 8, [tok.eos_token_id], tok.eos_token_id,
                                           {"cache_implementation": "static"})
    assert "cache_implementation" in gen.prefill_once_blocker(model, enc, static)
    one = gen.rollout_generation_config(1.0, 1.0, 4, 1, [tok.eos_token_id], tok.eos_token_id)
    assert gen.prefill_once_blocker(model, enc, one) == "one completion per prompt"
    short = {k: v[:, -1:] for k, v in enc.items()}
    assert gen.prefill_once_blocker(model, short, config) == "one-token prompts"
