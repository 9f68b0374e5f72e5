"""The baselines' losses (rerule_lightning.unlearning.losses) against values derived by hand on small tensors, and
their limiting cases: NPO's gradient → GA's as β → 0, IdkDPO = (2/β)·DPO (open-unlearning's scaling), SimNPO's
length normalisation, RMU's per-sequence mean over answer positions and its retain term 0 when the model equals the
frozen one."""

from __future__ import annotations

import math

import pytest
import torch

from rerule_lightning.primitives.prompting import IGNORE_INDEX
from rerule_lightning.unlearning import losses

IGN = IGNORE_INDEX


def _uniform_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # V = 4, all logits 0: every token has probability 1/4. Row 0: 2 answer tokens; row 1: 1 answer token.
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[IGN, IGN, 1, 2], [IGN, IGN, IGN, 3]])
    return logits, labels


def test_sequence_logprob_and_nll_by_hand() -> None:
    logits, labels = _uniform_batch()
    logp, lengths = losses.sequence_logprob(logits, labels)
    assert lengths.tolist() == [2.0, 1.0]
    torch.testing.assert_close(logp, torch.tensor([2 * math.log(0.25), math.log(0.25)]), rtol=0, atol=1e-6)
    # mean over the 3 answer tokens of the batch
    torch.testing.assert_close(losses.masked_nll(logits, labels), torch.tensor(math.log(4.0)), rtol=0, atol=1e-6)
    # the logit at position t predicts the label at t + 1: favour token 1 at position 1 only
    logits[0, 1, 1] = math.log(3.0)  # p(1) = 3 / 6 = 0.5 there
    logp, _ = losses.sequence_logprob(logits, labels)
    assert logp[0].item() == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-6)


def test_ga_and_graddiff_by_hand() -> None:
    f, r = torch.tensor(1.0), torch.tensor(0.5)
    assert losses.ga_loss(f).item() == -1.0
    assert losses.graddiff_loss(f, r, gamma=2.0, alpha=3.0).item() == -2.0 + 1.5
    assert losses.graddiff_loss(f, r).item() == -1.0 + 0.5


def test_npo_by_hand_in_both_forms() -> None:
    logp, ref, beta = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), 0.5
    # (2/β)·mean log(1 + (π/π_ref)^β), with log(π/π_ref) = [1, -1]
    ratio_form = (2 / beta) * 0.5 * (math.log(1 + math.exp(beta * 1)) + math.log(1 + math.exp(-beta)))
    # −(2/β)·mean log σ(−β·Δ)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    sigmoid_form = -(2 / beta) * 0.5 * (math.log(sig(-beta)) + math.log(sig(beta)))
    assert ratio_form == pytest.approx(sigmoid_form, rel=1e-12)
    assert losses.npo_loss(logp, ref, beta).item() == pytest.approx(ratio_form, rel=1e-6)
    # at π_θ = π_ref the loss is (2/β)·log 2 for any β
    assert losses.npo_loss(ref, ref, 0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="beta=0"):
        losses.npo_loss(logp, ref, 0.0)


def _tiny_lm_grads(loss_fn) -> torch.Tensor:  # noqa: ANN001
    """Gradient of ``loss_fn(logits, labels)`` w.r.t. a free logits tensor (two answers of equal length 2)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[IGN, IGN, 1, 2], [IGN, IGN, 4, 0]])
    loss_fn(logits, labels).backward()
    return logits.grad


def test_npo_gradient_tends_to_gradient_ascent_as_beta_goes_to_zero() -> None:
    with torch.no_grad():
        torch.manual_seed(1)
        ref_logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGN, IGN, 1, 2], [IGN, IGN, 4, 0]])
    ref, _ = losses.sequence_logprob(ref_logits, labels)

    def npo(beta: float):  # noqa: ANN202
        return lambda lg, lb: losses.npo_loss(losses.sequence_logprob(lg, lb)[0], ref, beta)

    # GA on the summed sequence NLL (minimise mean_i ℓ_θ(y_i)); with equal answer lengths L = 2 that is
    # L × the token-mean GA loss ga_loss(masked_nll)
    ga_seq = _tiny_lm_grads(lambda lg, lb: losses.sequence_logprob(lg, lb)[0].mean())
    ga_tok = _tiny_lm_grads(lambda lg, lb: losses.ga_loss(losses.masked_nll(lg, lb)))
    torch.testing.assert_close(ga_seq, 2 * ga_tok, rtol=1e-5, atol=1e-7)
    err = [(_tiny_lm_grads(npo(b)) - ga_seq).abs().max().item() for b in (1.0, 0.1, 1e-4)]
    assert err[0] > err[1] > err[2] and err[2] < 1e-4 * ga_seq.abs().max().item() * 10
    # at a finite β the gradient is GA's scaled per sequence by 2σ(β·(ℓ_θ − ℓ_ref)), never larger than 2×


def test_simnpo_by_hand_and_its_length_normalisation() -> None:
    logp, lengths = torch.tensor([-4.0, -2.0]), torch.tensor([2.0, 1.0])
    # −(β/|y|)·ℓ − γ = [−(2/2)(−4) − 0.5, −(2/1)(−2) − 0.5] = [3.5, 3.5]; loss = −(2/β)·log σ(3.5)
    expected = -(2 / 2.0) * math.log(1 / (1 + math.exp(-3.5)))
    assert losses.simnpo_loss(logp, lengths, beta=2.0, gamma=0.5).item() == pytest.approx(expected, rel=1e-6)
    # length normalisation: the same per-token log-likelihood over k times the tokens gives the same loss
    one = losses.simnpo_loss(torch.tensor([-1.5]), torch.tensor([3.0]), beta=2.5)
    five = losses.simnpo_loss(torch.tensor([-7.5]), torch.tensor([15.0]), beta=2.5)
    assert one.item() == pytest.approx(five.item(), rel=1e-6)
    # ... while unnormalised NPO-style scoring (no reference) would not: it depends on the length
    assert losses.npo_loss(torch.tensor([-1.5]), torch.zeros(1), 2.5).item() != pytest.approx(
        losses.npo_loss(torch.tensor([-7.5]), torch.zeros(1), 2.5).item())


def test_dpo_by_hand_and_idkdpo_is_dpo_scaled_by_two_over_beta() -> None:
    chosen, ref_c = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    rejected, ref_r = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -3.0])
    # margins: (1 − 2) = −1 and (0 − (−1)) = 1; β = 1: mean(−log σ(−1), −log σ(1)) = mean(log(1+e), log(1+e^−1))
    expected = 0.5 * (math.log(1 + math.e) + math.log(1 + math.exp(-1)))
    assert losses.dpo_loss(chosen, ref_c, rejected, ref_r, beta=1.0).item() == pytest.approx(expected, rel=1e-6)
    # IdkDPO = (2/β)·DPO (open-unlearning's DPO trainer): β = 0.5 gives margins ±0.5 and a factor 4:
    # 4 · ½·(log(1 + e^0.5) + log(1 + e^−0.5)) = 2·(0.974077 + 0.474077) = 2.896308
    by_hand = 4 * 0.5 * (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-0.5)))
    assert by_hand == pytest.approx(2.896308, abs=1e-6)
    assert losses.idk_dpo_loss(chosen, ref_c, rejected, ref_r, beta=0.5).item() == pytest.approx(by_hand, rel=1e-6)
    # at π_θ = π_ref every margin is 0: (2/β)·log 2 = 20·log 2 at β = 0.1 (plain DPO: log 2), NPO's value there
    assert losses.dpo_loss(ref_c, ref_c, ref_r, ref_r, 0.1).item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses.idk_dpo_loss(ref_c, ref_c, ref_r, ref_r, 0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)
    assert losses.idk_dpo_loss(ref_c, ref_c, ref_r, ref_r, 0.1).item() == \
        pytest.approx(losses.npo_loss(ref_r, ref_r, 0.1).item(), rel=1e-6)
    # its gradient is 2/β times DPO's: d/dℓ_θ(y_l) of −(2/β)·log σ(β·m) at m = 0 is (2/β)·β·σ(0)/B = 1/B = 0.5
    logp = rejected.clone().requires_grad_(True)
    losses.idk_dpo_loss(ref_c, ref_c, logp, rejected.detach(), 0.1).backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.5, 0.5]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="beta=0"):
        losses.idk_dpo_loss(ref_c, ref_c, ref_r, ref_r, 0.0)


def test_rmu_terms_by_hand() -> None:
    control = losses.rmu_control_vector(8, seed=3, coeff=6.5)
    assert control.norm().item() == pytest.approx(6.5, rel=1e-6) and (control >= 0).all()
    torch.testing.assert_close(control, losses.rmu_control_vector(8, seed=3, coeff=6.5), rtol=0, atol=0)
    h = control.expand(2, 3, 8).clone()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert losses.rmu_forget_loss(h, mask, control).item() == 0.0
    h[0, 0] += 2.0  # (1/D)·‖2·1‖² = 4 at one of row 0's 2 counted positions: row 0 = 4/2 = 2, row 1 = 0
    h[0, 2] += 100.0  # a masked position does not count
    # per sequence, then over the batch (open-unlearning): (2 + 0)/2 = 1 (pooling all 3 tokens would give 4/3)
    assert losses.rmu_forget_loss(h, mask, control).item() == pytest.approx(1.0, rel=1e-6)
    frozen = torch.randn(2, 3, 8)
    assert losses.rmu_retain_loss(frozen.clone(), frozen, mask).item() == 0.0
    moved = frozen.clone()
    moved[1, 0] += 1.0  # row 1's only counted position: (1/8)·8 = 1; row 0: 0; mean 0.5 (pooled: 1/3)
    assert losses.rmu_retain_loss(moved, frozen, mask).item() == pytest.approx(0.5, rel=1e-6)
    # a sequence with no counted position contributes 0 (no division by zero)
    assert losses.rmu_activation_mse(torch.ones(1, 2, 4), torch.zeros(1, 2)).item() == 0.0


def test_rmu_counts_the_answer_tokens_positions() -> None:
    labels = torch.tensor([[IGN, IGN, 5, 6], [IGN, 7, IGN, IGN]])  # prompt, answer, padding as prompting builds them
    torch.testing.assert_close(losses.answer_positions(labels), torch.tensor([[0.0, 0, 1, 1], [0, 1, 0, 0]]))
    control = torch.zeros(4)
    h = torch.zeros(2, 4, 4)
    h[0, 0] = 10.0  # a prompt position: never counted
    h[0, 3] = 2.0  # an answer position of row 0: (1/4)·(4·4) = 4, over its 2 answer positions: 2; row 1: 0
    assert losses.rmu_forget_loss(h, losses.answer_positions(labels), control).item() == pytest.approx(1.0, rel=1e-6)


def test_kl_retain_by_hand() -> None:
    labels = torch.tensor([[IGN, 0, 1]])  # positions 0 and 1 predict answer tokens
    ref = torch.zeros(1, 3, 2)  # p_ref = [1/2, 1/2]
    cur = torch.zeros(1, 3, 2)
    assert losses.kl_retain_loss(cur, ref, labels).item() == 0.0
    cur[0, 0] = torch.tensor([math.log(0.25), math.log(0.75)])  # KL(p_ref ‖ q) = ½ log(½/¼) + ½ log(½/¾)
    cur[0, 2] = torch.tensor([5.0, -5.0])  # the last position predicts nothing: never counted
    expected = 0.5 * (0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert losses.kl_retain_loss(cur, ref, labels).item() == pytest.approx(expected, rel=1e-6)
