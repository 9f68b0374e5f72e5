"""TOFU author structure: which rows belong to which author, the author's name, and author similarity.

TOFU ships no author column. Its question files are ordered by author, ``rows_per_author`` (20 in the
released data) consecutive rows each, so ``row // rows_per_author`` is the author index within a config.

* **Name** (:func:`author_name`): the most frequent run of 2-4 capitalised words in the author's questions
  (then answers), leading question words dropped ("What", "How", ...), longer runs preferred on ties;
  ``"author <index>"`` when nothing repeats. TOFU names the author in most of their 20 questions.
* **Profile** (:func:`profile_tokens`): the author's content words (lower case, 4+ letters, not a stop word,
  not part of the name) over questions and answers: genre, nationality, city, profession and award words.
* **Nearness** (:func:`rank_by_nearness`): a retain author's score is the largest number of profile words it
  shares with any forget author; ties broken by the author index. Boundary prompts come from the nearest
  retain authors first (same genre / country / parents' professions), the closest analogue TOFU offers to
  RULE's "related entity" boundary.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_CAP_RUN = re.compile(r"[A-Z][\w'\-]*(?:\s+[A-Z][\w'\-]*)+")
_LEADING = {"what", "how", "who", "when", "where", "which", "why", "is", "are", "was", "were", "does", "did", "do",
            "can", "could", "has", "have", "in", "the", "a", "an", "as", "for", "with", "on", "of", "and", "author"}
STOP_WORDS = frozenset("""
about above after again against also among another answer author authors been before being below between both
book books born could did does doing during each english even ever from further genre have having her here hers
herself him himself his however into itself just known like made many more most much name named other over
own same several should some such than that their theirs them themselves then there these they this those
through under until very were what when where which while whom whose will with within without work works would
write writes writer written wrote your""".split())


def author_index(row: int, rows_per_author: int) -> int:
    """The author of 0-based ``row`` in a TOFU config (rows are grouped by author, in order)."""
    if rows_per_author < 1:
        raise ValueError(f"rows_per_author={rows_per_author}: must be >= 1")
    return row // rows_per_author


def group_by_author(n_rows: int, rows_per_author: int) -> list[list[int]]:
    """Row indices of each author, ``[[0..k-1], [k..2k-1], ...]`` (the last group may be short)."""
    return [list(range(s, min(s + rows_per_author, n_rows))) for s in range(0, n_rows, rows_per_author)]


def _candidates(text: str) -> list[str]:
    out = []
    for m in _CAP_RUN.finditer(text):
        words = [w.strip("'-") for w in m.group(0).split()]
        while words and words[0].lower() in _LEADING:
            words = words[1:]
        words = [w[:-2] if w.endswith("'s") else w for w in words]
        if 2 <= len(words) <= 4:
            out.append(" ".join(words))
    return out


def author_name(questions: Sequence[str], answers: Sequence[str] = (), fallback: str = "") -> str:
    """The author's name as it recurs in their questions (see the module docstring)."""
    for texts in (questions, list(questions) + list(answers)):
        counts = Counter(c for t in texts for c in set(_candidates(t)))
        best = sorted(((n, len(c.split()), c) for c, n in counts.items() if n >= 2), reverse=True)
        if best:
            return best[0][2]
    return fallback


def profile_tokens(texts: Sequence[str], name: str = "") -> set[str]:
    """Content words of an author's questions and answers, without the author's own name."""
    name_words = {w.lower() for w in re.findall(r"[A-Za-z]+", name)}
    words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]{4,}", t)}
    return {w for w in words if w not in STOP_WORDS and w not in name_words}


def rank_by_nearness(candidates: dict[int, set[str]], anchors: Sequence[set[str]]) -> list[tuple[int, int]]:
    """``(author, score)`` of every candidate, nearest first: score = most profile words shared with any anchor
    (a forget author); ties by author index."""
    scored = [(a, max((len(toks & f) for f in anchors), default=0)) for a, toks in candidates.items()]
    return sorted(scored, key=lambda x: (-x[1], x[0]))


__all__ = ["STOP_WORDS", "author_index", "author_name", "group_by_author", "profile_tokens", "rank_by_nearness"]
