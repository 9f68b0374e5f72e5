"""The relearning halves: the forget targets (authors) split in two, fixed per world.

Each target's rank is the SHA-256 of ``"<target>|<content hash>|<salt>"``; the first ``ceil(n / 2)`` targets in
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


def split_halves(targets: Sequence[str], content_hash: str, salt: str = RELEARN_SALT) -> tuple[list[str], list[str]]:
    """``(first, second)``: the distinct targets split by :func:`target_rank`, each half sorted by name.

    Raises:
        ValueError: Fewer than 2 distinct targets (nothing to hold out).
    """
    uniq = sorted(set(targets))
    if len(uniq) < 2:
        raise ValueError(f"relearning needs at least 2 distinct forget targets to split in halves, got {uniq}")
    order = sorted(uniq, key=lambda t: (target_rank(t, content_hash, salt), t))
    k = (len(order) + 1) // 2
    return sorted(order[:k]), sorted(order[k:])
