"""GRPO loss pieces against values derived by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rerule_lightning.primitives.rollout import replay_slots
from rerule_lightning.rl.grpo import (
    LOSS_TYPES,
    aggregate_loss,
    aggregate_parts,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    off_policy_loss,
    token_logprobs,
)

D = torch.float64


def t(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


# --- group advantages ------------------------------------------------------------------------------------

REWARDS = t([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
# Row 0: mean 0.5, centred [.5, -.5, .5, -.5], Bessel var = 4 · 0.25 / 3 = 1/3, std = sqrt(1/3).
# Row 1: mean 0.25, centred [-.25, -.25, -.25, .75], var = (3 · 0.0625 + 0.5625) / 3 = 0.25, std = 0.5.
CENTRED = t([[0.5, -0.5, 0.5, -0.5], [-0.25, -0.25, -0.25, 0.75]])


def test_group_advantages_group_scale() -> None:
    expected = torch.stack([CENTRED[0] / (math.sqrt(1 / 3) + 1e-4), CENTRED[1] / (0.5 + 1e-4)])
    torch.testing.assert_close(group_advantages(REWARDS, "group"), expected)


def test_group_advantages_batch_scale() -> None:
    # All 8 rewards: mean 3/8, Σ(x−μ)² = 3·(5/8)² + 5·(3/8)² = 120/64, Bessel var = 120/64/7 = 15/56.
    expected = CENTRED / (math.sqrt(15 / 56) + 1e-4)
    torch.testing.assert_close(group_advantages(REWARDS, "batch"), expected)


def test_group_advantages_none_scale_and_eps() -> None:
    torch.testing.assert_close(group_advantages(REWARDS, "none"), CENTRED)
    # eps = 0.5: row 1 is divided by 0.5 + 0.5 = 1.
    torch.testing.assert_close(group_advantages(REWARDS, "group", eps=0.5)[1], CENTRED[1])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_degenerate(scale: str) -> None:
    single = group_advantages(t([[1.0], [0.0]]), scale)  # G == 1
    assert torch.equal(single, torch.zeros(2, 1, dtype=D))
    equal = group_advantages(t([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]), scale)  # zero variance everywhere
    assert torch.equal(equal, torch.zeros(2, 3, dtype=D))
    ints = group_advantages(torch.tensor([[1, 0]]), scale)  # integer rewards become float
    assert ints.is_floating_point() and not ints.isnan().any()


def test_group_advantages_bad_scale() -> None:
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(REWARDS, "running")


# --- token log-probs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 8])
def test_token_logprobs_matches_log_softmax(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 4, 11, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, 11, (5, 4), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = token_logprobs(logits, targets, chunk_size=chunk_size)
    assert out.shape == (5, 4) and out.dtype == torch.float32
    # two float32 log-sum-exp implementations (vectorised exp differs by CPU): a few ulp of values up to ~15,
    # where one ulp is ~1e-6
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)


def test_token_logprobs_upcasts_low_precision() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 7, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 7, (3, 2), generator=g)
    out = token_logprobs(logits, targets, chunk_size=2)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)  # as above: two float32 implementations
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, targets, chunk_size=0)


# --- k3 KL -----------------------------------------------------------------------------------------------

def test_k3_kl() -> None:
    logp = t([[-1.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ref = t([[-1.0, -2.0, math.log(2), -math.log(2), 2.0, 3.0, 50.0]])
    # d = ref − logp: 0, 0, ln2, −ln2, 2, 3, 50 → the log-ratio is clamped to ±20 (verl), so 50 → 20.
    # exp(d) − d − 1: 0, 0, 2 − ln2 − 1, 1/2 + ln2 − 1, e² − 3 ≈ 4.39, e³ − 4 ≈ 16.1, e²⁰ − 21;
    # then the estimate is clamped to [−10, 10]: the last two become 10.
    expected = t([[0.0, 0.0, 1 - math.log(2), math.log(2) - 0.5, math.exp(2) - 3, 10.0, 10.0]])
    torch.testing.assert_close(k3_kl(logp, ref), expected)
    # d = −50 → −20: e^−20 + 20 − 1 ≈ 19 → 10 as well (k3 grows linearly for negative d).
    torch.testing.assert_close(k3_kl(t([50.0]), t([0.0])), t([10.0]))
    # clamp = 1: d = −5 → −1: e^−1 + 1 − 1 = e^−1.
    torch.testing.assert_close(k3_kl(t([5.0]), t([0.0]), clamp=1.0), t([math.exp(-1)]))


def test_k3_kl_gradient_stops_where_a_clamp_binds() -> None:
    # d/d logp of exp(d) − d − 1 with d = ref − logp: −exp(d) + 1. At d = ln 2: −1. At d = 3 the estimate
    # (≈ 16.1) is clamped to 10 and at d = 50 the log-ratio is clamped: no gradient from either.
    logp = t([0.0, 0.0, 0.0]).requires_grad_()
    k3_kl(logp, t([math.log(2), 3.0, 50.0])).sum().backward()
    torch.testing.assert_close(logp.grad, t([-1.0, 0.0, 0.0]))


# --- clipped surrogate -----------------------------------------------------------------------------------

# eps_low = 0.1, eps_high = 0.3: the ratio is free in [0.9, 1.3].
CLIP_CASES = [
    # (ratio, advantage, loss, clipped, d loss / d logp)
    (1.29, 1.0, -1.29, False, -1.29),  # inside: −ρA; gradient −ρA
    (1.31, 1.0, -1.30, True, 0.0),  # above 1.3 with A > 0: −1.3·A, no gradient
    (0.85, 1.0, -0.85, False, -0.85),  # below 0.9 but A > 0: min(0.85, 0.9) = 0.85 unclipped
    (0.91, -1.0, 0.91, False, 0.91),  # inside with A < 0: −(−0.91)
    (0.89, -1.0, 0.90, True, 0.0),  # below 0.9 with A < 0: min(−0.89, −0.9) = −0.9 → loss 0.9
    (1.50, -1.0, 1.50, False, 1.50),  # above 1.3 with A < 0: min(−1.5, −1.3) = −1.5 unclipped
    (1.31, -2.0, 2.62, False, 2.62),  # A = −2: min(−2.62, −2.6) = −2.62
    (0.89, 2.0, -1.78, False, -1.78),  # A = 2: min(1.78, 1.8) = 1.78
    (1.31, 2.0, -2.60, True, 0.0),  # A = 2: min(2.62, 2.6) = 2.6
]


@pytest.mark.parametrize(("ratio", "adv", "loss", "clipped", "grad"), CLIP_CASES)
def test_clipped_surrogate_by_hand(ratio: float, adv: float, loss: float, clipped: bool, grad: float) -> None:
    logp = t([[math.log(ratio)]]).requires_grad_()
    out, mask = clipped_surrogate(logp, t([[0.0]]), t([adv]), eps_low=0.1, eps_high=0.3)
    torch.testing.assert_close(out, t([[loss]]))
    assert mask.dtype == torch.bool and bool(mask) is clipped
    out.sum().backward()
    torch.testing.assert_close(logp.grad, t([[grad]]))  # d(−ρA)/d logp = −ρA where unclipped


def test_dual_clip() -> None:
    logp = t([[math.log(4.0), math.log(2.0)], [math.log(4.0), 0.0]]).requires_grad_()
    out, _ = clipped_surrogate(logp, torch.zeros(2, 2, dtype=D), t([-1.0, 1.0]), dual_clip=3.0)
    # A = −1: ρ = 4 → loss 4 capped at −3·A = 3 (no gradient); ρ = 2 → loss 2 < 3 stays.
    # A = +1: no dual clip; ρ = 4 → −1.2; ρ = 1 → −1.
    torch.testing.assert_close(out, t([[3.0, 2.0], [-1.2, -1.0]]))
    out.sum().backward()
    torch.testing.assert_close(logp.grad, t([[0.0, 2.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(logp, logp, t([1.0, 1.0]), dual_clip=1.0)


# --- aggregation -----------------------------------------------------------------------------------------

PER_TOKEN = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # lengths 3 and 1; Σ ℓM = 1 + 2 + 3 + 4 = 10, Σ M = 4


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        ("grpo", {}, (6 / 3 + 4 / 1) / 2),  # per-sequence means 2 and 4 → 3
        ("bnpo", {}, 10 / 4),
        ("dr_grpo", {}, 10 / (2 * 3)),  # L = 3 by default
        ("dr_grpo", {"max_completion_length": 5}, 10 / (2 * 5)),
        ("dapo", {}, 10 / 4),  # local Σ M
        ("dapo", {"num_active_tokens": 8.0}, 10 / 8),  # e.g. 16 active tokens over 2 processes
    ],
)
def test_aggregate_loss_normalisers(loss_type: str, kwargs: dict, expected: float) -> None:
    out = aggregate_loss(PER_TOKEN, MASK, loss_type, **kwargs)
    torch.testing.assert_close(out, t(expected))
    assert torch.equal(aggregate_loss(PER_TOKEN, MASK.bool(), loss_type, **kwargs), out)


def test_aggregate_loss_empty_sequences() -> None:
    mask = t([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(aggregate_loss(PER_TOKEN, mask, "grpo"), t((2.0 + 0.0) / 2))  # empty row adds 0
    torch.testing.assert_close(aggregate_loss(PER_TOKEN, mask, "bnpo"), t(6 / 3))
    for loss_type in LOSS_TYPES:
        out = aggregate_loss(PER_TOKEN, torch.zeros(2, 3, dtype=D), loss_type)
        assert torch.equal(out, t(0.0)), loss_type
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        aggregate_loss(PER_TOKEN, MASK, "token_mean")


# --- the full GRPO loss ----------------------------------------------------------------------------------

def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = t([[-0.5, -1.0, -1.5], [-2.0, -0.1, -0.7]])
    # ratios: row 0 [1.5, 1, 1]; row 1 [0.5, 1, ·]; the last token of row 1 is padding.
    old = logp - t([[math.log(1.5), 0.0, 0.0], [math.log(0.5), 0.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantages_give_zero_loss_and_gradient(loss_type: str) -> None:
    logp, old, mask = _batch()
    logp.requires_grad_()
    loss, _ = grpo_loss(logp, old, torch.zeros(2, dtype=D), mask, loss_type=loss_type)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros_like(logp))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_positions_change_neither_loss_nor_gradient(loss_type: str) -> None:
    logp, old, mask = _batch()
    mask[0, 0] = 0.0  # a "prompt" token at the start of row 0 as well as the padding of row 1
    ref = logp - 0.3
    adv = t([1.0, -1.0])
    results = []
    # Masked-out (logp, old_logp, ref_logp) values: harmless ones, then ones whose ratio exp(5 + 1e4) and
    # KL exp(1e4) would overflow to inf (and turn the zero gradient into NaN) if they leaked.
    for lp_val, old_val, ref_val in ((-1.0, -1.0, -1.0), (5.0, -1e4, 1e4)):
        lp, o, r = logp.clone(), old.clone(), ref.clone()
        lp[mask == 0], o[mask == 0], r[mask == 0] = lp_val, old_val, ref_val
        lp.requires_grad_()
        loss, stats = grpo_loss(lp, o, adv, mask, ref_logp=r, beta=0.1, loss_type=loss_type, dual_clip=3.0)
        loss.backward()
        assert torch.equal(lp.grad[mask == 0], torch.zeros(2, dtype=D))
        results.append((loss.detach(), lp.grad, stats))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(g0, g1)
    for key in s0:
        torch.testing.assert_close(s0[key], s1[key])


def test_grpo_loss_stats_and_value_by_hand() -> None:
    logp, old, mask = _batch()
    ref = logp.clone()
    ref[0, 1] += math.log(2)  # d = ln 2 on one valid token: KL = 1 − ln 2; every other KL is 0
    ref[1, 2] += 5.0  # padding: ignored
    adv = t([1.0, -1.0])
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.5, loss_type="bnpo")
    # Per token surrogate (eps 0.2): row 0 (A = 1) ρ = [1.5, 1, 1] → [−1.2 (high clip), −1, −1];
    # row 1 (A = −1) ρ = [0.5, 1] → [0.8 (low clip: min(−0.5, −0.8) = −0.8), 1].
    # Plus β·KL = 0.5·(1 − ln 2) on token (0, 1). bnpo: Σ / 5.
    expected = (-1.2 - 1.0 - 1.0 + 0.8 + 1.0 + 0.5 * (1 - math.log(2))) / 5
    torch.testing.assert_close(loss, t(expected))
    torch.testing.assert_close(stats["kl"], t((1 - math.log(2)) / 5))
    torch.testing.assert_close(stats["clip_ratio/low_mean"], t(1 / 5))
    torch.testing.assert_close(stats["clip_ratio/high_mean"], t(1 / 5))
    torch.testing.assert_close(stats["clip_ratio/region_mean"], t(2 / 5))
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    # Without a reference the KL stat is 0 and the loss is the surrogate alone.
    loss, stats = grpo_loss(logp, old, adv, mask, loss_type="bnpo")
    torch.testing.assert_close(loss, t((-1.2 - 1.0 - 1.0 + 0.8 + 1.0) / 5))
    assert stats["kl"].item() == 0.0


def test_grpo_loss_on_policy_gradient() -> None:
    # old = logp: ρ = 1, so d loss / d logp_t = −A_b·M_t / Σ M (dapo, local Σ M = 5).
    logp, _, mask = _batch()
    logp.requires_grad_()
    adv = t([2.0, -1.0])
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    torch.testing.assert_close(loss, t((-2.0 * 3 + 1.0 * 2) / 5))
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / 5)
    assert stats["clip_ratio/region_mean"].item() == 0.0


# --- off-policy correction -------------------------------------------------------------------------------

RHO = t([[0.5, 1.5, 3.0], [1.0, 4.0, 100.0]])  # (1, 2) is padding: its huge ratio must not leak
BEHAVIOUR = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
OFF_MASK = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
OFF_ADV = t([1.0, -2.0])


def _off(correction: str, level: str = "token") -> tuple[torch.Tensor, torch.Tensor, dict]:
    logp = (BEHAVIOUR + RHO.log()).requires_grad_()
    loss, stats = off_policy_loss(logp, BEHAVIOUR, OFF_ADV, OFF_MASK, correction=correction, level=level, cap=2.0)
    (loss * OFF_MASK).sum().backward()
    return loss, logp, stats


def test_truncated_off_policy_by_hand() -> None:
    loss, logp, stats = _off("truncated")
    # min(ρ, 2) = [[0.5, 1.5, 2], [1, 2, ·]]; loss = −min(ρ, 2)·A·logp.
    w = t([[0.5, 1.5, 2.0], [1.0, 2.0, 2.0]])
    expected = -w * OFF_ADV[:, None] * logp.detach()
    torch.testing.assert_close(loss * OFF_MASK, expected * OFF_MASK)
    # Gradient: −min(ρ, 2)·A·M = [[−0.5, −1.5, −2], [2, 4, 0]].
    torch.testing.assert_close(logp.grad, t([[-0.5, -1.5, -2.0], [2.0, 4.0, 0.0]]))
    # Valid ρ = [0.5, 1.5, 3, 1, 4]: mean 10/5 = 2, max 4, ρ > 2 for 3 and 4 → 2/5;
    # ESS = (Σρ)² / (n·Σρ²) = 100 / (5 · (0.25 + 2.25 + 9 + 1 + 16)) = 100 / 142.5.
    torch.testing.assert_close(stats["is_weight_mean"], t(2.0))
    torch.testing.assert_close(stats["is_weight_max"], t(4.0))
    torch.testing.assert_close(stats["truncated_frac"], t(0.4))
    torch.testing.assert_close(stats["ess"], t(100 / 142.5))


def test_none_off_policy_is_plain_policy_gradient() -> None:
    loss, logp, stats = _off("none")
    torch.testing.assert_close(loss, -OFF_ADV[:, None] * logp.detach())
    torch.testing.assert_close(logp.grad, -OFF_ADV[:, None] * OFF_MASK)
    torch.testing.assert_close(stats["is_weight_mean"], t(2.0))  # stats still describe ρ


def test_clipped_off_policy_is_ppo_against_behaviour() -> None:
    loss, logp, _ = _off("clipped")
    expected, _ = clipped_surrogate(logp.detach(), BEHAVIOUR, OFF_ADV)
    torch.testing.assert_close(loss * OFF_MASK, expected * OFF_MASK)
    # Row 0 (A = 1): ρ = 0.5 unclipped → −0.5; 1.5 and 3 clipped high → 0. Row 1 (A = −2): ρ = 1 → 2;
    # ρ = 4: min(−8, −2.4) = −8 unclipped → 8.
    torch.testing.assert_close(logp.grad, t([[-0.5, 0.0, 0.0], [2.0, 8.0, 0.0]]))


def test_sequence_level_uses_geometric_mean_ratio() -> None:
    loss, logp, stats = _off("truncated", level="sequence")
    # Row 0: exp(mean(ln 0.5, ln 1.5, ln 3)) = 2.25^(1/3); row 1 over its 2 valid tokens: sqrt(1 · 4) = 2.
    g0 = 2.25 ** (1 / 3)
    w = t([[g0] * 3, [2.0, 2.0, 2.0]])
    torch.testing.assert_close(logp.grad, -w * OFF_ADV[:, None] * OFF_MASK)
    # Valid weights [g0, g0, g0, 2, 2]: none is > 2.
    torch.testing.assert_close(stats["is_weight_mean"], t((3 * g0 + 4) / 5))
    torch.testing.assert_close(stats["is_weight_max"], t(2.0))
    assert stats["truncated_frac"].item() == 0.0
    torch.testing.assert_close(stats["ess"], t((3 * g0 + 4) ** 2 / (5 * (3 * g0**2 + 8))))


def test_sequence_level_clipped_spreads_gradient_over_tokens() -> None:
    _, logp, _ = _off("clipped", level="sequence")
    # Row 0: ρ_seq = g0 ≈ 1.31 > 1.2 with A > 0 → clipped, no gradient. Row 1: ρ_seq = 2, A = −2:
    # min(−4, −2.4) = −4 unclipped; loss per token 2·ρ_seq, ρ_seq = exp((lr_0 + lr_1)/2), so
    # d/d logp_t of Σ_t loss_t = 2 tokens · 2 · ρ_seq / 2 = 4 on each valid token.
    torch.testing.assert_close(logp.grad, t([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0]]))


def test_clipped_off_policy_dual_clip_for_negative_advantages() -> None:
    # ρ = [0.5, 4, 10] against the behaviour policy, A = −1, ε = 0.2, dual clip c = 3:
    #   ρ = 0.5: min(−0.5, −0.8) = −0.8 → loss 0.8 (low clip, no gradient);
    #   ρ = 4:   min(−4, −1.2) = −4 → loss 4, capped at −c·A = 3 (no gradient);
    #   ρ = 10:  loss 10 → 3 (no gradient). Without the dual clip the last two keep loss ρ and gradient ρ.
    beh = t([[-1.0, -1.0, -1.0]])
    logp = (beh + t([[0.5, 4.0, 10.0]]).log()).requires_grad_()
    loss, _ = off_policy_loss(logp, beh, t([-1.0]), torch.ones(1, 3, dtype=D), correction="clipped", dual_clip=3.0)
    torch.testing.assert_close(loss, t([[0.8, 3.0, 3.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[0.0, 0.0, 0.0]]))
    logp.grad = None
    loss, _ = off_policy_loss(logp, beh, t([-1.0]), torch.ones(1, 3, dtype=D), correction="clipped")
    torch.testing.assert_close(loss, t([[0.8, 4.0, 10.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[0.0, 4.0, 10.0]]))
    # A > 0 is untouched by the dual clip: ρ = 4 → −min(4, 1.2) = −1.2.
    loss, _ = off_policy_loss(logp.detach(), beh, t([1.0]), torch.ones(1, 3, dtype=D), correction="clipped",
                              dual_clip=3.0)
    torch.testing.assert_close(loss, t([[-0.5, -1.2, -1.2]]))


# --- one normaliser for fresh and replayed tokens ----------------------------------------------------------

FRESH = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # 2 fresh sequences, lengths 3 and 1
FRESH_MASK = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # Σ ℓM = 10, Σ M = 4
REPLAY = t([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])  # 3 replayed sequences, lengths 2, 1, 0 (shorter L)
REPLAY_MASK = t([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # Σ ℓM = 60, Σ M = 3


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        # dapo / bnpo: (Σ fresh ℓM + w Σ replay ℓM) / (fresh tokens + replayed tokens) = (10 + 0.5·60) / 7.
        ("dapo", {}, (10 + 0.5 * 60) / 7),
        ("bnpo", {}, (10 + 0.5 * 60) / 7),
        # dapo's normaliser from outside (e.g. 14 tokens over 2 processes = 7 as well, or 10 here).
        ("dapo", {"num_active_tokens": 10.0}, (10 + 0.5 * 60) / 10),
        # grpo: mean over the 5 sequences of w·(per-sequence mean): fresh 2 and 4; replay 0.5·15, 0.5·30, 0.
        ("grpo", {}, (2 + 4 + 0.5 * 15 + 0.5 * 30 + 0) / 5),
        # dr_grpo: Σ wℓM / (5 sequences × max length 8).
        ("dr_grpo", {"max_completion_length": 8}, (10 + 0.5 * 60) / (5 * 8)),
    ],
)
def test_fresh_and_replayed_tokens_share_one_normaliser(loss_type: str, kwargs: dict, expected: float) -> None:
    out = aggregate_parts([(FRESH, FRESH_MASK, 1.0), (REPLAY, REPLAY_MASK, 0.5)], loss_type, **kwargs)
    torch.testing.assert_close(out, t(expected))


def test_one_part_of_weight_one_is_aggregate_loss_exactly() -> None:
    for loss_type in LOSS_TYPES:
        assert torch.equal(aggregate_parts([(FRESH, FRESH_MASK, 1.0)], loss_type),
                           aggregate_loss(FRESH, FRESH_MASK, loss_type))
    with pytest.raises(ValueError, match="at least one part"):
        aggregate_parts([], "dapo")


def test_grpo_loss_with_replayed_part_by_hand() -> None:
    # On-policy fresh part (ρ = 1): per token −A; A = [2, −1] over lengths 3 and 2 → Σ = −6 + 2 = −4, 5 tokens.
    # Replayed part: per-token losses [[1, 1], [3, ·]] (3 tokens) with weight 0.5 → 0.5·5 = 2.5.
    # dapo over 8 tokens: (−4 + 2.5) / 8.
    logp, _, mask = _batch()
    logp.requires_grad_()
    r_tok, r_mask = t([[1.0, 1.0], [3.0, 7.0]]), t([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = grpo_loss(logp, logp.detach(), t([2.0, -1.0]), mask, extra=[(r_tok, r_mask, 0.5)])
    torch.testing.assert_close(loss, t((-4 + 2.5) / 8))
    loss.backward()
    # the fresh gradient is −A·M / 8: the replayed tokens enlarge the normaliser the fresh tokens share
    torch.testing.assert_close(logp.grad, -t([2.0, -1.0])[:, None] * mask / 8)
    assert stats["clip_ratio/region_mean"].item() == 0.0


def test_replay_slots_add_and_fill() -> None:
    rewards = t([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])  # groups 0, 2, 3 zero-variance
    assert replay_slots(rewards, 2, "add") == ([0, 1], [])
    assert replay_slots(rewards, 2, "fill") == ([0, 1], [0, 2])  # the first two zero-variance groups
    assert replay_slots(rewards, 5, "fill") == ([0, 1, 2], [0, 2, 3])  # never more than the zero-variance ones
    assert replay_slots(rewards, 0, "fill") == ([], [])
    with pytest.raises(ValueError, match="add, fill"):
        replay_slots(rewards, 1, "swap")


def test_off_policy_empty_mask_and_errors() -> None:
    logp = t([[-1.0, -2.0]])
    _, stats = off_policy_loss(logp, logp - 1.0, t([1.0]), torch.zeros(1, 2, dtype=D))
    assert {k: v.item() for k, v in stats.items()} == {
        "is_weight_mean": 1.0, "is_weight_max": 1.0, "truncated_frac": 0.0, "ess": 1.0}
    with pytest.raises(ValueError, match="truncated, clipped, none"):
        off_policy_loss(logp, logp, t([1.0]), torch.ones(1, 2), correction="vtrace")
    with pytest.raises(ValueError, match="token, sequence"):
        off_policy_loss(logp, logp, t([1.0]), torch.ones(1, 2), level="group")
    with pytest.raises(ValueError, match="cap"):
        off_policy_loss(logp, logp, t([1.0]), torch.ones(1, 2), cap=0.0)


def test_replay_slots_fill_matches_labels() -> None:
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]])  # groups 0, 2, 3 zero-variance
    fresh = ["forget", "boundary", "boundary", "forget"]
    supplied = ["boundary", "boundary", "forget"]  # priority order
    # forget slot 0 <- supplied 2 (the only forget group); boundary slot 2 <- supplied 0; forget slot 3: none left
    assert replay_slots(rewards, 3, "fill", fresh, supplied) == ([2, 0], [0, 2])
    assert replay_slots(rewards, 3, "add", fresh, supplied) == ([0, 1, 2], [])
