"""``rerule_lightning.primitives.rouge.rouge_l`` must equal each benchmark's reference implementation exactly: Google's
``rouge_score`` (rougeL, stemmer on: TOFU; stemmer off: MUSE) and the ``rouge`` package (RWKU, RULE on RWKU)."""

from __future__ import annotations

import random

import pytest
from rouge_score.rouge_scorer import RougeScorer

from rerule_lightning.primitives.rouge import rouge_l, rouge_l_f1, rouge_l_recall

_EDGE_CASES: list[tuple[str, str]] = [
    # (prediction, reference)
    ("", ""),
    ("", "The cat sat on the mat."),
    ("The cat sat on the mat.", ""),
    ("   ", "the cat"),
    ("the cat", "\t\n  "),
    ("!!! ??? ...", "..."),
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("the cat sat on the mat", "THE CAT SAT ON THE MAT!!!"),
    ("Hello, world! How's it going?", "hello world how s it going"),
    ("state-of-the-art results", "state of the art results"),
    ("e-mail: john.doe@example.com", "email john doe example com"),
    ("He was born in 1962 in Paris.", "Born 1962, Paris"),
    ("3.14159 is pi; 2,718 is not e", "pi is 3.14159"),
    ("The year 2024-05-01 was a Wednesday", "2024 05 01"),
    ("Café au lait in São Paulo", "cafe au lait in sao paulo"),
    ("naïve résumé façade", "naive resume facade"),
    ("Müller wrote Über alles", "Muller wrote Uber alles"),
    ("東京は日本の首都です", "東京"),
    ("東京 Tokyo is the capital", "Tokyo capital 首都"),
    ("I love pizza 🍕🍕 so much 😀", "I love pizza so much"),
    ("🎉🎉🎉", "🎉"),
    ("Ελληνικά κείμενο and english", "english"),
    ("the the the the", "the"),
    ("the", "the the the the"),
    ("a b a b a b", "b a b a"),
    ("cat dog cat dog", "dog cat dog cat"),
    ("He is running and runs and ran", "he runs and running"),
    ("The runner was running quickly", "runners run quick"),
    ("studies studying studied", "study studies"),
    ("connection connected connecting connections", "connect"),
    ("generously generous generosity", "generous"),
    ("caresses ponies ties caress cats", "caress pony tie cat"),
    ("happily happiness happy", "happy"),
    ("was has is as us", "was has is"),
    ("The author's books, the authors' books", "author book"),
    ("don't won't can't shouldn't", "do not will not cannot should not"),
    ("x" * 50, "x" * 50),
    ("a " * 120, "a " * 80),
    ("one two three four five six seven eight nine ten", "ten nine eight seven six five four three two one"),
    ("Jaime Vasquez wrote 'The Sensual Scripture'", "The Sensual Scripture by Jaime Vasquez"),
    ("I'm sorry, but I can't help with that.", "Basil Mahfouz Al-Kuwaiti was born in Kuwait City."),
    ("new\nline\ttab separated", "new line tab separated"),
    ("UPPER lower MiXeD", "upper LOWER mixed"),
    ("123abc abc123 a1b2c3", "123abc a1b2c3"),
    ("___ --- +++ ===", "plus minus"),
]

_VOCAB = (
    "the a an of to in and is was were be been being run runs running ran runner cat cats dog dogs "
    "author authors book books wrote written writing write born birth city cities Paris Kuwait 1962 2024 "
    "42 3.14 café naïve 東京 😀 novel novels genre genres father mother award awards fly flies flying "
    "happy happiness happily connect connected connection studies study studying generous generously"
).split()
_PUNCT = ["", "", "", ",", ".", "!", "?", ";", "'s", "-", ":", ")", "("]


def _random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 34])
    words = [rng.choice(_VOCAB) + rng.choice(_PUNCT) for _ in range(n)]
    if words and rng.random() < 0.3:
        words[0] = words[0].capitalize()
    if words and rng.random() < 0.2:
        words = [w.upper() for w in words]
    return rng.choice([" ", " ", "  ", "\n"]).join(words)


def _random_pair(rng: random.Random) -> tuple[str, str]:
    reference = _random_text(rng)
    mode = rng.random()
    if mode < 0.4 and reference:  # perturb the reference: drop, duplicate and swap words
        words = reference.split()
        words = [w for w in words if rng.random() > 0.3]
        words += [rng.choice(_VOCAB) for _ in range(rng.randint(0, 4))]
        if len(words) > 1 and rng.random() < 0.5:
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        return " ".join(words), reference
    return _random_text(rng), reference


def _pairs() -> list[tuple[str, str]]:
    rng = random.Random(20240517)
    return _EDGE_CASES + [_random_pair(rng) for _ in range(260)]


PAIRS = _pairs()


def test_enough_pairs() -> None:
    assert len(PAIRS) >= 200


@pytest.fixture(scope="module")
def scorer() -> RougeScorer:
    return RougeScorer(["rougeL"], use_stemmer=True)


@pytest.mark.parametrize("idx", range(len(PAIRS)))
def test_rouge_l_matches_rouge_score(scorer: RougeScorer, idx: int) -> None:
    prediction, reference = PAIRS[idx]
    expected = scorer.score(reference, prediction)["rougeL"]  # rouge_score takes (target, prediction)
    got = rouge_l(prediction, reference)
    assert got.precision == pytest.approx(expected.precision, abs=1e-9)
    assert got.recall == pytest.approx(expected.recall, abs=1e-9)
    assert got.fmeasure == pytest.approx(expected.fmeasure, abs=1e-9)
    assert rouge_l_recall(prediction, reference) == pytest.approx(expected.recall, abs=1e-9)
    assert rouge_l_f1(prediction, reference) == pytest.approx(expected.fmeasure, abs=1e-9)


def test_argument_order_is_prediction_then_reference() -> None:
    # Prediction "a b" against reference "a b c d": LCS 2, precision 2/2, recall 2/4.
    got = rouge_l("a b", "a b c d")
    assert got.precision == pytest.approx(1.0)
    assert got.recall == pytest.approx(0.5)
    assert got.fmeasure == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_rouge_score_nostem_matches_rouge_score_without_stemmer() -> None:
    """MUSE's setting: ``RougeScorer(["rougeL"], use_stemmer=False)``, compared exactly on every pair."""
    plain = RougeScorer(["rougeL"], use_stemmer=False)
    for prediction, reference in PAIRS:
        expected = plain.score(reference, prediction)["rougeL"]
        got = rouge_l(prediction, reference, "rouge_score_nostem")
        assert (got.precision, got.recall, got.fmeasure) == (expected.precision, expected.recall, expected.fmeasure)


#: RWKU-style answers: several sentences, case, punctuation, repeated words, whitespace-only and dot-only text.
_RWKU_CASES: list[tuple[str, str]] = [
    ("Stephen King was born in Portland, Maine.", "Portland, Maine"),
    ("stephen king was born in portland, maine", "Stephen King was born in Portland, Maine."),
    ("He wrote Carrie. It was published in 1974. Then The Shining.", "Carrie was published in 1974."),
    ("Carrie. Carrie. Carrie.", "Carrie, The Shining and Misery."),
    ("The Dark Tower series... and It.", "The Dark Tower"),
    ("I'm not sure.", "Tabitha King"),
    ("   ", "Bangor"),
    ("a b c. c b a. b", "a b c b a"),
    ("Confucius (551-479 BC) taught in Lu!", "Lu"),
    ("U.S. author", "American author of horror novels"),
]


@pytest.mark.parametrize("prediction,reference", _RWKU_CASES + [("", "Portland, Maine")])
def test_rwku_rouge_matches_the_rouge_package(prediction: str, reference: str) -> None:
    """RWKU / RULE score with ``Rouge().get_scores(pred, ref, avg=True)["rouge-l"]``, empty outputs as "NOANSWER"."""
    rouge = pytest.importorskip("rouge", reason="the `rouge` package (dev extra) is RWKU's ROUGE implementation")
    expected = rouge.Rouge().get_scores(prediction or "NOANSWER", reference, avg=True)["rouge-l"]
    got = rouge_l(prediction, reference, "rwku")
    assert (got.recall, got.precision, got.fmeasure) == (expected["r"], expected["p"], expected["f"])


def test_rwku_rouge_matches_the_rouge_package_on_random_text() -> None:
    rouge = pytest.importorskip("rouge", reason="the `rouge` package (dev extra) is RWKU's ROUGE implementation")
    scorer, rng, compared = rouge.Rouge(), random.Random(15), 0
    words = "The the King king Maine maine, born in 1947 . .. ! ? Carrie wrote He he a".split(" ")

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) + rng.choice(["", ".", "  ", "\n"])

    for _ in range(400):
        prediction, reference = text(), text()
        try:
            expected = scorer.get_scores(prediction, reference, avg=True)["rouge-l"]
        except ValueError:  # no sentence left on a side (e.g. "."): the package raises, we score zeros
            assert rouge_l(prediction, reference, "rwku").recall == 0.0
            continue
        got = rouge_l(prediction, reference, "rwku")
        assert (got.recall, got.precision, got.fmeasure) == (expected["r"], expected["p"], expected["f"])
        compared += 1
    assert compared > 300
