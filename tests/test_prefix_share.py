"""The shared-prefix policy pass (each prompt encoded once per group, gradients through the shared prompt) against
the full pass it replaces: log-probs and gradients for full fine-tuning, LoRA and QLoRA, micro-batched, with
groups of different prompts and sizes (replayed groups), the fallback named in the log, and one Trainer step.

Tolerance: both passes compute the same float32 quantities, only in a different order (the prompt's keys /
values come from a ``[U, P]`` batch instead of an ``[N, P]`` one; the completion attends over a cache instead of
one causal pass), so values differ by a few ulps per op. Log-probs of the tiny model are O(1..10): ``atol 1e-5``
is ~100 ulps at 10. Gradients are sums over ~100 rows×tokens of such terms: compared with ``rtol 1e-4`` on the
whole gradient's norm (a per-entry test would trip on entries that cancel to ~0).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives import logprobs as lp
from rerule_lightning.primitives.policy import PolicyConfig, build_policy
from rerule_lightning.rl.micro_batch import LossPart, accumulate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(vocab: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Three fresh groups of G = 3 and two 'replayed' groups of 2 rows with other prompts (lengths 1..6)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (4, 2, 7, 5, 3)]
    p_ids = [x for x, k in zip(prompts, (3, 3, 3, 2, 2)) for _ in range(k)]
    n = len(p_ids)
    lengths = torch.randint(1, 7, (n,), generator=g)  # [N]
    c_ids = torch.randint(3, vocab, (n, 8), generator=g)  # [N, T]
    c_mask = (torch.arange(8)[None, :] < lengths[:, None]).float()  # [N, T]
    return p_ids, c_ids.masked_fill(c_mask == 0, 0), c_mask


def _module(model: torch.nn.Module, share: bool) -> GRPOUnlearningModule:
    module = GRPOUnlearningModule(temperature=0.7, beta=0.0, share_prompt_prefix=share)
    module.model = model
    module.tokenizer = SimpleNamespace(pad_token_id=0)
    return module


def _logp_and_grad(module: GRPOUnlearningModule, batch: tuple, micro: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every row and the gradient of Σ w·logp (w fixed, uneven), micro-batched through ``accumulate``."""
    p_ids, c_ids, c_mask = batch
    w = torch.linspace(-1.0, 2.0, c_ids.numel()).view_as(c_ids)  # [N, T]
    part = LossPart(p_ids, c_ids, c_mask, lambda logp, m, sl: logp * w[sl, :logp.size(1)])
    params = [p for p in module.model.parameters() if p.requires_grad]
    module.model.zero_grad()
    _, (logp,) = accumulate([part], module.sequence_logprobs, lambda loss: loss.backward(), "bnpo", micro, 8)
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    return logp, grad


def _assert_same(model: torch.nn.Module, micro: int | None, vocab: int) -> None:
    batch = _batch(vocab)
    m = batch[2][:, :6]  # [N, T'], the longest completion has 6 tokens
    full_logp, full_grad = _logp_and_grad(_module(model, False), batch, micro)
    shared_logp, shared_grad = _logp_and_grad(_module(model, True), batch, micro)
    assert full_logp.shape == shared_logp.shape == m.shape
    # float32: the two passes sum the same attention terms in another order; a log-prob of magnitude ~10 (QLoRA's
    # dequantised weights give such tokens) then differs by a few ulps of 10 (~1e-6 each): 1e-5 relative, 1e-5
    # absolute near 0
    torch.testing.assert_close(shared_logp * m, full_logp * m, atol=1e-5, rtol=1e-5)
    assert full_grad.norm() > 0
    assert (shared_grad - full_grad).norm() <= 1e-4 * full_grad.norm(), (shared_grad - full_grad).norm()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("micro", [None, 4])
@pytest.mark.parametrize("peft", ["full", "lora"])
def test_shared_policy_pass_equals_the_full_pass(tiny_prepared: dict, peft: str, micro: int | None, threads: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(threads)  # one_torch_thread restores the count
    calls: list[int] = []
    real = lp.shared_prefix_logprobs
    monkeypatch.setattr(lp, "shared_prefix_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build_policy(PolicyConfig(name_or_path=tiny_prepared["links"]["target"], peft=peft, lora_r=4))
    model.train()
    if peft == "lora":  # lora_B starts at zero: move it so the adapters change the log-probs
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    _assert_same(model, micro, model.config.vocab_size)
    assert calls, "the shared pass never ran"


def test_shared_policy_pass_equals_the_full_pass_under_qlora(tiny_prepared: dict) -> None:
    from tests.test_grpo_module import _bnb_4bit_cpu_error

    reason = _bnb_4bit_cpu_error()
    if reason is not None:
        pytest.skip(f"bitsandbytes cannot run 4-bit NF4 on this CPU: {reason}")
    model = build_policy(PolicyConfig(name_or_path=tiny_prepared["links"]["target"], peft="qlora", lora_r=4))
    model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    _assert_same(model, 5, model.config.vocab_size)


def test_gradient_checkpointing_falls_back_to_the_full_pass_named_once(tiny_prepared: dict,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "_FALLBACKS_LOGGED", set())
    model = build_policy(PolicyConfig(name_or_path=tiny_prepared["links"]["target"], gradient_checkpointing=True))
    model.train()
    calls: list[int] = []
    monkeypatch.setattr(lp, "shared_prefix_logprobs", lambda *a, **k: calls.append(1))
    module = _module(model, True)
    batch = _batch(model.config.vocab_size)
    with caplog.at_level(logging.WARNING, logger=lp.__name__):
        for _ in range(2):
            logp, _ = module.sequence_logprobs(*batch)
    assert not calls and logp.requires_grad
    named = [r.getMessage() for r in caplog.records if "shared-prefix policy pass off" in r.getMessage()]
    assert len(named) == 1 and "gradient checkpointing" in named[0]
    with torch.no_grad():  # without gradient (the reference pass) the cache is shared all the same
        lp.completion_logprobs(model, *batch, 0, share_prefix=True)
    assert calls == [1]


def test_active_lora_dropout_falls_back_and_eval_mode_shares(tiny_prepared: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "_FALLBACKS_LOGGED", set())
    model = build_policy(PolicyConfig(name_or_path=tiny_prepared["links"]["target"], peft="lora", lora_dropout=0.1))
    assert "dropout" in lp.prefix_share_blocker(model.train())
    assert lp.prefix_share_blocker(model.eval()) is None  # dropout is off in eval mode


def test_a_trainer_step_gives_the_same_parameters_with_and_without_sharing(tiny_prepared: dict, tmp_path: Any) -> None:
    from tests.test_grpo_module import fit, make

    after = {}
    for share in (False, True):
        module, data = make(tiny_prepared, share_prompt_prefix=share, micro_batch_size=6)
        fit(module, data, 1, tmp_path / str(share))
        after[share] = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    before = make(tiny_prepared)[0]
    before.configure_model()
    start = dict(before.model.named_parameters())
    moved = [k for k in start if not torch.equal(start[k], after[True][k])]
    assert len(moved) > len(start) // 2  # the step trained (lr 1e-2 moves most parameters)
    # AdamW's first step moves an entry by lr·g/(|g| + 1e-8): rounding of the gradient is amplified where |g| is
    # near 1e-8 (seen: one entry in 8192 off by 3e-5 = 0.3 % of lr), so 1 % of lr bounds every entry
    for k, v in after[True].items():
        torch.testing.assert_close(v, after[False][k], atol=1e-2 * 1e-2, rtol=0)
