"""Halves fixed per world: keys (authors) split in two by a salted hash of the world's content.

Two users, one rule: the relearning attack's halves of the forget authors (salt ``"relearn"``: trained on the
first, evaluated on the second; ``rerule attack``) and the frontier benchmark's selection / report halves of every
evaluation split (salt ``"select"``: ``datamodules.embedded.derive_halves``). Each target's rank is the SHA-256 of ``"<target>|<content hash>|<salt>"``; the first ``ceil(n / 2)`` targets in
that order form the trained half (``first``), the rest the evaluated half (``second``). The split depends only on
the names, the data's content hash and the salt, so an already-prepared world gets the same halves on every
machine and in every run, and no target is in both halves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

RELEARN_SALT = "relearn"


def target_rank(target: str, content_hash: str, salt: str = RELEARN_SALT) -> str:
    """The hex digest that orders ``target`` among the forget targets."""
    return hashlib.sha256(f"{target}|{content_hash}|{salt}".encode()).hexdigest()


def hashed_halves(keys: Sequence[str], content_hash: str, salt: str) -> tuple[list[str], list[str]]:
    """``(first, second)``: the distinct keys ordered by :func:`target_rank`, the first ``ceil(n / 2)`` and the
    rest, each half sorted by name (one key: it is the first half; none: two empty halves)."""
    order = sorted(set(keys), key=lambda t: (target_rank(t, content_hash, salt), t))
    k = (len(order) + 1) // 2
    return sorted(order[:k]), sorted(order[k:])


def split_halves(targets: Sequence[str], content_hash: str, salt: str = RELEARN_SALT) -> tuple[list[str], list[str]]:
    """The relearning halves: :func:`hashed_halves` of the forget targets, which must be at least two.

    Raises:
        ValueError: Fewer than 2 distinct targets (nothing to hold out).
    """
    if len(set(targets)) < 2:
        raise ValueError(f"relearning needs at least 2 distinct forget targets to split in halves, "
                         f"got {sorted(set(targets))}")
    return hashed_halves(targets, content_hash, salt)
