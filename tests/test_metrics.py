"""Unlearning metrics: hand-derived values for the functional metrics, and each Metric class against its twin."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rerule_lightning.evaluation.metrics import (
    AnswerAccuracy,
    AnswerProbability,
    ExtractionStrength,
    Fluency,
    ForgetQuality,
    MembershipAUC,
    MinKPercent,
    PrivLeak,
    RefusalRate,
    RougeLF1,
    RougeLRecall,
    TruthRatio,
    answer_accuracy,
    answer_correct,
    answer_probability,
    auc_score,
    extraction_strength,
    fluency,
    forget_quality,
    forget_truth_ratio_agg,
    harmonic_mean,
    knowmem_scores,
    min_k_percent,
    model_utility,
    ngram_entropy,
    normalized_option_probability,
    privleak,
    refusal_rate,
    retain_truth_ratio_agg,
    rouge_l_f1_scores,
    rouge_l_recall_scores,
    truth_ratio,
    verbmem_scores,
)
from rerule_lightning.evaluation.metrics.functional import fluency_tokens
from rerule_lightning.primitives.rouge import rouge_l

LN2, LN4, LN8 = math.log(2), math.log(4), math.log(8)


def _sorry(text: str) -> bool:
    return text.lower().startswith("sorry")


# ---------------------------------------------------------------- teacher-forced ----------------------------


def test_answer_probability() -> None:
    # exp(-0) = 1, exp(-ln 2) = 1/2, exp(-ln 4) = 1/4
    got = answer_probability(torch.tensor([0.0, LN2, LN4], dtype=torch.float64))
    assert torch.allclose(got, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


def test_truth_ratio_and_aggregators() -> None:
    # item 0: perturbed probs 1/2 and 1/8 -> geometric mean sqrt(1/16) = 1/4 = exp(-mean(ln2, ln8)) = exp(-ln4);
    #         paraphrased prob exp(-ln2) = 1/2 -> TR = (1/4) / (1/2) = 0.5
    # item 1: perturbed probs 1 and 1 -> 1; paraphrased 1/2 -> TR = 2
    pert = torch.tensor([[LN2, LN8], [0.0, 0.0]], dtype=torch.float64)
    para = torch.tensor([LN2, LN2], dtype=torch.float64)
    tr = truth_ratio(pert, para)
    assert torch.allclose(tr, torch.tensor([0.5, 2.0], dtype=torch.float64))
    # forget: mean(min(0.5, 2), min(2, 0.5)) = 0.5; retain: mean(max(0, 1 - 0.5), max(0, 1 - 2)) = 0.25
    assert forget_truth_ratio_agg(tr) == pytest.approx(0.5)
    assert retain_truth_ratio_agg(tr) == pytest.approx(0.25)
    # [N] perturbed is read as one option per item: exp(ln2 - ln4) = 0.5
    assert truth_ratio(torch.tensor([LN4]), torch.tensor([LN2])).item() == pytest.approx(0.5)
    assert math.isnan(forget_truth_ratio_agg(torch.zeros(0)))


def test_forget_quality_exact_small_cases() -> None:
    # identical samples: D = 0 -> p = 1
    assert forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    # fully separated samples of sizes 3 and 3: D = 1; under H0 each of the C(6, 3) = 20 orderings is equally
    # likely and only 2 of them (all x below all y, or above) give D = 1 -> two-sided p = 2/20 = 0.1
    assert forget_quality(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])) == pytest.approx(0.1)
    # sizes 2 and 2 fully separated: 2 / C(4, 2) = 1/3
    assert forget_quality([0.0, 0.1], [5.0, 6.0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        forget_quality([], [1.0])


def test_harmonic_mean_and_model_utility() -> None:
    # 2 / (1/1 + 1/0.5) = 2/3
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.7, 0.0, 0.9]) == 0.0  # a zero component gives 0, no ZeroDivisionError
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([0.5, -0.1])
    # 3 / (2 + 4 + 1) = 3/7
    assert model_utility({"retain_probability": 0.5, "retain_rouge_l_recall": 0.25,
                          "retain_truth_ratio": 1.0}) == pytest.approx(3 / 7)


def test_normalized_option_probability() -> None:
    # p_true = 1/2, perturbed 1/4 and 1/4 -> 0.5 / (0.5 + 0.25 + 0.25) = 0.5
    # p_true = 1, perturbed 1 -> 1 / 2
    true = torch.tensor([LN2, 0.0], dtype=torch.float64)
    pert = torch.tensor([[LN4, LN4], [0.0, 1e4]], dtype=torch.float64)
    got = normalized_option_probability(true, pert)
    assert torch.allclose(got, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_min_k_percent() -> None:
    lp = torch.tensor([
        [-1.0, -2.0, -3.0, -4.0, -5.0],  # n = 5, m = int(2.0) = 2: lowest -5, -4 -> 4.5
        [-0.5, -3.0, -1.0, -9.0, -9.0],  # n = 3 (mask), m = int(1.2) = 1: lowest -3 -> 3.0
        [-7.0, -9.0, -9.0, -9.0, -9.0],  # n = 1, m = max(1, int(0.4)) = 1 -> 7.0
        [-1.0, -1.0, -1.0, -1.0, -1.0],  # n = 0 -> nan
    ])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    got = min_k_percent(lp, mask, k=0.4)
    assert torch.allclose(got[:3], torch.tensor([4.5, 3.0, 7.0]))
    assert math.isnan(got[3].item())
    # k = 1: negative mean of all valid tokens: (1+2+3+4+5)/5 = 3; (0.5+3+1)/3 = 1.5
    assert torch.allclose(min_k_percent(lp, mask, k=1.0)[:2], torch.tensor([3.0, 1.5]))
    with pytest.raises(ValueError):
        min_k_percent(lp, mask, k=0.0)


def _brute_auc(neg: list[float], pos: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_with_ties() -> None:
    # members (label 0) [1, 2, 2], non-members (label 1) [2, 3]:
    # non-member 2 beats member 1 (1) and ties members 2, 2 (0.5 + 0.5); non-member 3 beats all three (3)
    # -> (1 + 0.5 + 0.5 + 3) / (2 * 3) = 5/6
    assert auc_score([1.0, 2.0, 2.0], [2.0, 3.0]) == pytest.approx(5 / 6)
    assert auc_score([1.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(0.5)
    rng = random.Random(0)
    for _ in range(20):
        neg = [float(rng.randint(0, 5)) for _ in range(rng.randint(1, 15))]
        pos = [float(rng.randint(0, 5)) for _ in range(rng.randint(1, 15))]
        assert auc_score(neg, pos) == pytest.approx(_brute_auc(neg, pos), abs=1e-12)


def test_auc_orientation_and_privleak() -> None:
    # "model": forget items (members) have low Min-K scores (look memorised), holdout high -> AUC 1
    forget_scores, holdout_scores = [0.5, 0.7, 0.9], [2.0, 2.5, 3.0]
    auc_model = auc_score(forget_scores, holdout_scores)
    assert auc_model == pytest.approx(1.0)
    # retain reference indistinguishable -> AUC 0.5; privleak = ((1-1) - (1-0.5)) / (1-0.5) * 100 = -100
    auc_retain = auc_score([1.0, 2.0], [1.0, 2.0])
    assert auc_retain == pytest.approx(0.5)
    assert privleak(auc_model, auc_retain) == pytest.approx(-100.0)
    assert privleak(auc_retain, auc_retain) == pytest.approx(0.0)
    # over-unlearned: AUC 0.25 -> (0.75 - 0.5) / 0.5 * 100 = 50
    assert privleak(0.25, 0.5) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="auc_retain"):
        privleak(0.9, 1.0)


def test_extraction_strength() -> None:
    target = torch.tensor([[5, 5, 1, 2, 3, 4], [5, 5, 1, 2, 3, 4], [5, 5, 1, 2, 3, 4],
                           [5, 5, 1, 2, 3, 4], [5, 5, 1, 2, 0, 0]])
    pred = torch.tensor([
        [0, 0, 1, 2, 3, 4],  # all 4 answer tokens right: k = 0 -> 1.0 (prompt positions are masked)
        [0, 0, 9, 9, 3, 4],  # suffix from index 2 matches: k = 2 -> 1 - 2/4 = 0.5
        [0, 0, 1, 9, 3, 4],  # index 1 wrong: k = 2 -> 0.5 (the earlier correct token does not count)
        [0, 0, 1, 2, 3, 9],  # last token wrong: k = |y| = 4 -> 0.0
        [0, 0, 9, 2, 7, 7],  # |y| = 2 (positions 2, 3), index 0 wrong: k = 1 -> 0.5 (padding ignored)
    ])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]] * 4 + [[0, 0, 1, 1, 0, 0]])
    got = extraction_strength(pred, target, mask)
    assert torch.allclose(got, torch.tensor([1.0, 0.5, 0.5, 0.0, 0.5], dtype=torch.float64))
    assert math.isnan(extraction_strength(pred[:1], target[:1], torch.zeros(1, 6))[0].item())


# ---------------------------------------------------------------- generation --------------------------------


def test_fluency_by_hand() -> None:
    # "a b a b": 2-grams (a,b), (b,a), (a,b) -> freqs 2/3, 1/3 -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3) = 0.918296
    #            3-grams (a,b,a), (b,a,b) -> H3 = 1
    #            (2/3 * 0.918296 + 4/3 * 1) / 2 = 0.972765
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("a b a b") == pytest.approx(0.972765, abs=1e-6)
    # "The cat sat." -> tokens The, cat, sat, . -> three distinct 2-grams (log2 3), two distinct 3-grams (1)
    assert fluency_tokens("The cat sat.") == ["The", "cat", "sat", "."]
    assert ngram_entropy("The cat sat.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3) / 2)
    # fewer than 2 tokens: no n-grams -> entropy 0; the mean over texts
    assert ngram_entropy("") == 0.0 and ngram_entropy("word") == 0.0
    assert fluency(["a b a b", "", "The cat sat."]) == pytest.approx(
        (0.972765 + 0.0 + (2 / 3 * math.log2(3) + 4 / 3) / 2) / 3, abs=1e-6)
    # sentences are split before word tokenisation, as nltk.word_tokenize does
    assert fluency_tokens("He left. She stayed!") == ["He", "left", ".", "She", "stayed", "!"]
    assert math.isnan(fluency([]))


def test_refusal_rate() -> None:
    preds = ["Sorry, I can't.", "Paris.", "sorry no", "It is Rome."]
    assert refusal_rate(preds, refusal_fn=_sorry) == pytest.approx(0.5)
    # default detector (rerule_lightning.rl.rewards.is_refusal)
    assert refusal_rate(["I'm sorry, but I can't share information about that.",
                         "The capital of France is Paris."]) == pytest.approx(0.5)
    assert math.isnan(refusal_rate([], refusal_fn=_sorry))


def test_answer_correct_and_accuracy() -> None:
    assert answer_correct("The capital is PARIS.", "paris", refusal_fn=_sorry)
    assert answer_correct("born in  New\nYork City", "new york", refusal_fn=_sorry)  # whitespace collapsed
    assert not answer_correct("Sorry, I won't say it is Paris.", "Paris", refusal_fn=_sorry)  # refusal
    assert not answer_correct("It is Rome.", "Paris", refusal_fn=_sorry)
    assert not answer_correct("anything", "  ", refusal_fn=_sorry)  # empty reference never matches
    preds = ["Paris", "Sorry, Paris", "Rome", "It was 1962."]
    values = ["paris", "paris", "paris", "1962"]
    # correct: 1st and 4th -> 2/4
    assert answer_accuracy(preds, values, refusal_fn=_sorry) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        answer_accuracy(preds, values[:2], refusal_fn=_sorry)


def test_rouge_lists_and_muse() -> None:
    preds, refs = ["the cat sat", "a dog", ""], ["the cat sat on the mat", "a dog", "x"]
    # "the cat sat" vs 6-token reference: LCS 3 -> recall 3/6, precision 3/3, F1 = 2*1*0.5/1.5 = 2/3
    assert rouge_l_recall_scores(preds, refs) == pytest.approx([0.5, 1.0, 0.0])
    assert rouge_l_f1_scores(preds, refs) == pytest.approx([2 / 3, 1.0, 0.0])
    assert verbmem_scores(preds, refs) == rouge_l_f1_scores(preds, refs)
    assert knowmem_scores(preds, refs) == [rouge_l(p, r).fmeasure for p, r in zip(preds, refs, strict=True)]


# ---------------------------------------------------------------- Metric classes ----------------------------

_PREDS = ["Sorry, no.", "The capital is Paris.", "He was born in 1962 in Kuwait.", "I think it's Rome",
          "running runs ran", "sorry", "Paris Paris Paris", "the cat sat on the mat today"]
_REFS = ["Paris", "paris", "1962", "Paris", "runner", "x", "paris", "the cat sat on the mat"]


def _two_updates(metric, *columns):  # noqa: ANN001, ANN202
    """Update with the first 3 items, then the rest, and compute."""
    metric.update(*[c[:3] for c in columns])
    metric.update(*[c[3:] for c in columns])
    return metric.compute()


def test_text_metric_classes_match_functional() -> None:
    assert _two_updates(RefusalRate(refusal_fn=_sorry), _PREDS).item() == pytest.approx(
        refusal_rate(_PREDS, refusal_fn=_sorry))
    assert _two_updates(AnswerAccuracy(refusal_fn=_sorry), _PREDS, _REFS).item() == pytest.approx(
        answer_accuracy(_PREDS, _REFS, refusal_fn=_sorry))
    rl = rouge_l_recall_scores(_PREDS, _REFS)
    assert _two_updates(RougeLRecall(), _PREDS, _REFS).item() == pytest.approx(sum(rl) / len(rl))
    f1 = rouge_l_f1_scores(_PREDS, _REFS)
    assert _two_updates(RougeLF1(), _PREDS, _REFS).item() == pytest.approx(sum(f1) / len(f1))
    assert _two_updates(Fluency(), _PREDS).item() == pytest.approx(fluency(_PREDS))
    assert Fluency.higher_is_better is True and RougeLRecall.full_state_update is False


def _tf_data(n: int = 10, p: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "nll": torch.rand(n, generator=g, dtype=torch.float64) * 3,  # [N]
        "pert": torch.rand(n, p, generator=g, dtype=torch.float64) * 3,  # [N, P]
        "para": torch.rand(n, generator=g, dtype=torch.float64) * 3,  # [N]
        "lp": -torch.rand(n, 7, generator=g, dtype=torch.float64) * 5,  # [N, L]
        "mask": torch.rand(n, 7, generator=g) > 0.3,  # [N, L]
        "member": torch.arange(n) % 2 == 0,  # [N]
        "target": torch.randint(0, 3, (n, 7), generator=g),  # [N, L]
        "pred": torch.randint(0, 3, (n, 7), generator=g),  # [N, L]
    }


def test_likelihood_metric_classes_match_functional() -> None:
    d = _tf_data()
    assert _two_updates(AnswerProbability(), d["nll"]).item() == pytest.approx(
        answer_probability(d["nll"]).mean().item())
    assert _two_updates(AnswerProbability(), d["nll"], d["pert"]).item() == pytest.approx(
        normalized_option_probability(d["nll"], d["pert"]).mean().item())
    tr = truth_ratio(d["pert"], d["para"])
    for agg, fn in (("forget", forget_truth_ratio_agg), ("retain", retain_truth_ratio_agg)):
        m = TruthRatio(aggregator=agg)
        assert _two_updates(m, d["pert"], d["para"]).item() == pytest.approx(fn(tr))
        assert torch.allclose(m.per_item(), tr)
    retain_tr = torch.linspace(0.2, 1.5, 9)
    fq = ForgetQuality(retain_truth_ratios=retain_tr)
    assert _two_updates(fq, tr).item() == pytest.approx(forget_quality(tr, retain_tr))
    scores = min_k_percent(d["lp"], d["mask"])
    mk = MinKPercent(k=0.4)
    assert _two_updates(mk, d["lp"], d["mask"]).item() == pytest.approx(scores.nanmean().item())
    assert torch.allclose(mk.per_item(), scores, equal_nan=True)
    s, member = scores.nan_to_num(0.0), d["member"]
    auc = auc_score(s[member], s[~member])
    assert _two_updates(MembershipAUC(), s, member).item() == pytest.approx(auc)
    assert _two_updates(PrivLeak(auc_retain=0.4), s, member).item() == pytest.approx(privleak(auc, 0.4))
    es = extraction_strength(d["pred"], d["target"], d["mask"])
    assert _two_updates(ExtractionStrength(), d["pred"], d["target"], d["mask"]).item() == pytest.approx(
        es.nanmean().item())
    with pytest.raises(ValueError):
        TruthRatio(aggregator="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PrivLeak(auc_retain=1.0)


def test_reset() -> None:
    m = RougeLRecall()
    m.update(["a b"], ["a b c d"])
    assert m.compute().item() == pytest.approx(0.5)
    m.reset()
    m.update(["a b c d"], ["a b"])
    assert m.compute().item() == pytest.approx(1.0)
    m.reset()
    with pytest.warns(UserWarning):  # torchmetrics warns on compute before update
        assert math.isnan(m.compute().item())

    tr = TruthRatio("retain")
    tr.update(torch.tensor([[LN4]]), torch.tensor([LN2]))
    assert tr.per_item().tolist() == pytest.approx([0.5])
    tr.reset()
    assert tr.per_item().numel() == 0
    tr.update(torch.tensor([[0.0]]), torch.tensor([LN2]))  # TR = 2 -> retain aggregate max(0, 1-2) = 0
    assert tr.compute().item() == pytest.approx(0.0)

    fq = ForgetQuality(retain_truth_ratios=[1.0, 2.0, 3.0])
    fq.update(torch.tensor([4.0, 5.0, 6.0]))
    assert fq.compute().item() == pytest.approx(0.1)
    fq.reset()  # the retain reference survives reset
    fq.update(torch.tensor([1.0, 2.0, 3.0]))
    assert fq.compute().item() == pytest.approx(1.0)

    auc = MembershipAUC()
    auc.update(torch.tensor([0.1, 0.2, 5.0, 6.0]), torch.tensor([True, True, False, False]))
    assert auc.compute().item() == pytest.approx(1.0)
    auc.reset()
    auc.update(torch.tensor([5.0, 6.0, 0.1, 0.2]), torch.tensor([True, True, False, False]))
    assert auc.compute().item() == pytest.approx(0.0)


def test_state_dtype_survives_device_move() -> None:
    m = TruthRatio().to("cpu")
    assert m.dtype == torch.float64
    m.update(torch.tensor([[LN4]], dtype=torch.float32), torch.tensor([LN2], dtype=torch.float32))
    assert m.per_item().dtype == torch.float64


def test_forward_accumulates_and_undefined_values_are_nan() -> None:
    auc = MembershipAUC()
    # forward on a batch of members only: the batch AUC is undefined (nan), not an error
    assert math.isnan(auc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])).item())
    auc(torch.tensor([3.0, 4.0]), torch.tensor([False, False]))
    assert auc.compute().item() == pytest.approx(1.0)  # accumulated over both batches
    tr = TruthRatio("forget")
    tr(torch.tensor([[LN4]]), torch.tensor([LN2]))  # TR 0.5
    tr(torch.tensor([[0.0]]), torch.tensor([LN2]))  # TR 2
    assert tr.compute().item() == pytest.approx(0.5)
    assert sorted(tr.per_item().tolist()) == pytest.approx([0.5, 2.0])
    with pytest.warns(UserWarning):  # compute before update
        assert math.isnan(ForgetQuality(retain_truth_ratios=[1.0]).compute().item())
