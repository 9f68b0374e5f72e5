"""RWKU RL prompt construction and RWKU's prompt format (pure functions; the datamodule is in
:mod:`datamodules.benchmarks.rwku`, whose docstring describes the construction).

Templates are ours: each pairs a question about an entity ``{e}`` with its fill-in-the-blank rewrite (RULE's
RWKU data likewise pairs every forget question with a fill-in-the-blank rewrite). The wrappers in
:func:`wrap_query` are RWKU's evaluation prompt format, which rollouts share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rerule_lightning.primitives.prompting import format_prompt

QUESTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Who is {e}?", "{e} is best described as ___."),
    ("What is {e} best known for?", "{e} is best known for ___."),
    ("Where was {e} born?", "{e} was born in ___."),
    ("When was {e} born?", "{e} was born in the year ___."),
    ("What nationality is {e}?", "The nationality of {e} is ___."),
    ("What is the profession of {e}?", "By profession, {e} is ___."),
    ("What are the most famous works or achievements of {e}?", "The most famous achievement of {e} is ___."),
    ("Which awards or honours has {e} received?", "One honour received by {e} is ___."),
    ("Who are the family members of {e}?", "A family member of {e} is ___."),
    ("Where did {e} grow up?", "{e} grew up in ___."),
    ("How did {e} begin their career?", "{e} began a career as ___."),
    ("Who worked closely with {e}?", "A close collaborator of {e} is ___."),
)
_STOP = frozenset("a an and the of in on at to for by with from as is was are were be been who whose which that "
                  "this its it his her their he she they known best".split())
_BLANK = "Please complete the blank in the following question.\nQuestion: {q}\n"
_BRIEF = "Please briefly answer the following question.\nQuestion: {q}\n"


def normalise(text: str) -> str:
    """Lower case, alphanumeric words joined by single spaces (for probe / prompt comparisons)."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def select_targets(all_targets: Sequence[str], targets: Sequence[str] | int) -> list[str]:
    """The targets to forget: the given names (each must exist) or the first ``targets`` in dataset order."""
    if isinstance(targets, int):
        if not 1 <= targets <= len(all_targets):
            raise ValueError(f"data.targets={targets}: choose 1..{len(all_targets)} (forget_target has "
                             f"{len(all_targets)} targets) or a list of names")
        return list(all_targets[:targets])
    unknown = [t for t in targets if t not in all_targets]
    if unknown or not targets:
        raise ValueError(f"data.targets: unknown target(s) {unknown} (or none given); forget_target has "
                         f"{list(all_targets)[:10]}{' ...' if len(all_targets) > 10 else ''}")
    return list(targets)


_FORGET_REQUEST = re.compile(r"^\s*Please forget [^.]*\.\s*")


def strip_forget_request(intro: str) -> str:
    """The intro without RWKU's leading request sentence ("Please forget X. X is ..." -> "X is ..."): every
    released intro starts with it, and it must never become a prompt or an anchor."""
    return _FORGET_REQUEST.sub("", intro, count=1)


def _content(text: str) -> set[str]:
    return {w for w in normalise(text).split() if w not in _STOP}


def related_entities(target: str, intros: dict[str, str], exclude: Sequence[str], k: int) -> list[str]:
    """The ``k`` entities of ``intros`` (not ``target``, not in ``exclude``) whose intro's content words are
    most similar (Jaccard) to ``target``'s; ties broken by name."""
    mine = _content(intros[target]) - _content(target)
    scored = []
    for name, intro in intros.items():
        if name == target or name in exclude:
            continue
        other = _content(intro) - _content(name)
        union = mine | other
        scored.append((-(len(mine & other) / len(union) if union else 0.0), name))
    return [name for _, name in sorted(scored)[:k]]


def intro_blank(intro: str) -> tuple[str, str]:
    """``(query, answer)``: the intro's first ``ceil(n/2)`` words followed by `` ___.``, and the rest (without
    its final full stop)."""
    words = intro.split()
    cut = max(1, math.ceil(len(words) / 2))
    return " ".join(words[:cut]) + " ___.", " ".join(words[cut:]).rstrip(".")


def _row(rid: str, question: str, label: str, kind: str, style: str, target: str, reference: str = "") -> dict:
    return {"id": rid, "question": question, "label": label, "kind": kind, "reference": reference,
            "target": target, "value": reference, "style": style}


def template_prompts(entity: str, label: str, prefix: str) -> list[dict[str, Any]]:
    """Every template about ``entity`` as a question and as a blank (reference to be filled for boundary)."""
    rows = []
    for i, (question, blank) in enumerate(QUESTION_TEMPLATES):
        rows.append(_row(f"{prefix}-q{i}", question.format(e=entity), label, f"{prefix.split(':')[0]}_question",
                         "question", entity))
        rows.append(_row(f"{prefix}-b{i}", blank.format(e=entity), label, f"{prefix.split(':')[0]}_blank", "blank",
                         entity))
    return rows


def rl_prompts(targets: Sequence[str], intros: dict[str, str], swaps_per_target: int,
               boundary_entities: Sequence[str] = (),
               train_questions: dict[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Forget and boundary RL rows for ``targets`` (see the module docstring); ``reference`` is "" for
    ``boundary_swap_*`` rows until :func:`fill_references` sets the original model's answers. With
    ``train_questions`` (target -> RWKU's training-side questions) each target also gets
    :func:`training_prompts` about its related entities."""
    rows: list[dict[str, Any]] = []
    for t in targets:
        related = related_entities(t, intros, targets, swaps_per_target)
        extra = [b for b in boundary_entities if b not in targets and b not in related]
        rows += template_prompts(t, "forget", f"forget:{t}")
        q, _ = intro_blank(intros[t])
        rows.append(_row(f"forget:{t}-intro", q, "forget", "forget_intro", "blank", t))
        for e in related + extra:
            rows += template_prompts(e, "boundary", f"boundary_swap:{t}:{e}")
            if e in intros:
                q, a = intro_blank(intros[e])
                rows.append(_row(f"boundary_intro:{t}:{e}", q, "boundary", "boundary_intro", "blank", e, a))
        if train_questions and train_questions.get(t) and related + extra:
            rows += training_prompts(t, train_questions[t], related + extra)
    seen: set[str] = set()
    unique = []
    for r in rows:  # an entity related to two targets is asked once
        key = r["label"] + "|" + normalise(r["question"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def swap_entity(question: str, target: str, entity: str) -> str | None:
    """``question`` with every whole-word occurrence of ``target`` replaced by ``entity`` (the same question
    about another person, RULE's boundary construction); ``None`` when the question does not name ``target``."""
    pattern = re.compile(r"(?<![\w])" + re.escape(target) + r"(?![\w])")
    return pattern.sub(entity, question) if pattern.search(question) else None


def training_prompts(target: str, questions: Sequence[str], related: Sequence[str]) -> list[dict[str, Any]]:
    """RL rows from RWKU's training-side questions about ``target`` (``train_refusal_llama3``'s ``instruction``):
    each question is a forget prompt (``forget_train_question``), and as many boundary prompts
    (``boundary_swap_train``) ask the same questions about the ``related`` entities in turn (question i about
    ``related[i % len(related)]``; a question that does not name the target cannot be swapped and the next
    one is used, cycling through the entities again until the count matches or no swap is new), so forget and
    boundary are 1:1. Boundary references are the original model's answers (filled later)."""
    rows = [_row(f"forget:{target}-t{i}", q, "forget", "forget_train_question", "question", target)
            for i, q in enumerate(questions)]
    swappable = [(i, q) for i, q in enumerate(questions) if swap_entity(q, target, target + "_") is not None]
    boundary: list[dict[str, Any]] = []
    used: set[tuple[int, str]] = set()
    for k in range(len(swappable) * len(related)):  # pass p = k // n asks question j about entity (j + p) % R
        if len(boundary) >= len(rows):
            break
        j, p = k % len(swappable), k // len(swappable)
        i, q = swappable[j]
        e = related[(j + p) % len(related)]
        if (i, e) in used:
            continue
        used.add((i, e))
        boundary.append(_row(f"boundary_swap:{target}:{e}-t{i}", swap_entity(q, target, e) or q, "boundary",
                             "boundary_swap_train", "question", e))
    return rows + boundary


def drop_probe_collisions(rows: Sequence[dict], probe_queries: Sequence[str]) -> list[dict]:
    """``rows`` without any whose normalised question equals a probe query."""
    probes = {normalise(q) for q in probe_queries}
    return [r for r in rows if normalise(r["question"]) not in probes]


def assert_disjoint(rows: Sequence[dict], probe_queries: Sequence[str]) -> None:
    """Raise if any RL prompt is an evaluation probe (normalised text equality)."""
    probes = {normalise(q) for q in probe_queries}
    clash = [r["id"] for r in rows if normalise(r["question"]) in probes]
    if clash:
        raise ValueError(f"RWKU RL prompts {clash[:5]} are evaluation probes; RL must never train on them")


def pool_owner(rid: str) -> str:
    """The forgotten target an RL row belongs to, from its id (``forget:<t>-<k>``, ``boundary_*:<t>:<e>...``)."""
    kind, rest = rid.split(":", 1)
    return rest.rsplit("-", 1)[0] if kind == "forget" else rest.split(":", 1)[0]


def pool_counts(pool: Sequence[dict], targets: Sequence[str]) -> list[str]:
    """One line per target: its forget and boundary RL prompts by source (printed in ``prepare_data``)."""
    lines = []
    for t in targets:
        mine = [r for r in pool if pool_owner(r["id"]) == t]
        f = [r for r in mine if r["label"] == "forget"]
        b = [r for r in mine if r["label"] == "boundary"]
        ft = sum(r["kind"] == "forget_train_question" for r in f)
        bt = sum(r["kind"] == "boundary_swap_train" for r in b)
        lines.append(f"target {t!r}: {len(f)} forget RL prompts ({ft} training-side questions, {len(f) - ft} "
                     f"template questions/blanks/intro), {len(b)} boundary ({bt} training-side questions about "
                     f"related entities, {len(b) - bt} template swaps/intros)")
    return lines


def needs_reference(row: dict) -> bool:
    """Boundary rows whose reference is the original model's greedy answer."""
    return row["kind"].startswith("boundary_swap")


def wrap_query(query: str, style: str) -> tuple[str, str]:
    """RWKU's evaluation wrapper: (user message, text appended after the chat template's generation prompt)."""
    if style == "blank":
        return _BLANK.format(q=query), "Answer:"
    if style == "question":
        return _BRIEF.format(q=query), "Answer:"
    if style == "affirmative suffix":
        return _BRIEF.format(q=query).rstrip("\n"), ""
    if style == "incontext learning":
        return f"Please briefly answer the following question.\n{query}\n", "Answer:"
    if style == "instruction":
        return f"Instruction: {query}\n", ""
    raise ValueError(f"unknown RWKU prompt style {style!r}")


def render_rwku(row: dict[str, Any], chat: bool, tokenizer: Any = None) -> str:
    """The prompt the model sees: the wrapped query in the chat template (or as is in the raw format) + suffix.

    Every consumer prepends the bos id, so the template's own leading bos text is dropped
    (:func:`rerule_lightning.primitives.prompting.format_prompt`)."""
    if row.get("style") == "text":
        return ""
    user, suffix = wrap_query(row["question"], row["style"])
    if not chat:
        return user + suffix
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("RWKU prompt_format='chat' needs a tokenizer that has a chat_template")
    return format_prompt(user, tokenizer, use_chat_template=True) + suffix  # (a leading bos text is dropped)


def probe_style(config: str, row: dict) -> str:
    """The wrapper style of a probe: level 1 -> blank, level 2 -> question, level 3 by its attack type."""
    if config.endswith("level1"):
        return "blank"
    if config == "forget_level3" and row["type"] in ("affirmative suffix", "incontext learning"):
        return row["type"]
    return "question"
