"""Scoring attacked models with the project's own evaluator, and the one table of attack results.

:func:`evaluate_splits` runs :class:`~rerule_lightning.evaluation.evaluator.UnlearningEvaluator` over item lists
whose prompts are already rendered (``render_prompts=False``), so an attack reports exactly the metrics, the
refusal detector and the fact matcher of ``rerule test``. :func:`attack_rows` flattens an ``attack.json`` result
into rows ``(attack, setting, split, metric, value, delta)``, ``delta`` being the value minus the same
metric of the unattacked model (greedy, plain prompts) where one exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rerule_lightning.evaluation.evaluator import UnlearningEvaluator
from rerule_lightning.evaluation.suite import EvalSuite, SplitSpec


def generation_suite(splits: Sequence[str] | Mapping[str, str], like: EvalSuite | None = None,
                     name: str = "attack") -> EvalSuite:
    """A generation-only suite (no teacher-forced passes). ``splits`` names its splits, or maps each name to the
    split of ``like`` whose ROUGE, token budget and stop strings it takes (a list maps each name to itself)."""
    base_of = dict(splits) if isinstance(splits, Mapping) else {s: s for s in splits}
    specs = []
    for s, b in base_of.items():
        base = like.spec(b) if like is not None and b in like.split_names else SplitSpec(s)
        specs.append(SplitSpec(s, generate=True, max_new_tokens=base.max_new_tokens, stop=base.stop,
                               teacher_forced=False, rouge=base.rouge, reference_max_tokens=base.reference_max_tokens))
    return EvalSuite(name, specs)


def evaluate_splits(model: Any, tokenizer: Any, items: Mapping[str, Sequence[Mapping[str, Any]]], suite: EvalSuite,
                    max_new_tokens: int, batch_size: int = 64, use_chat_template: bool = False) -> dict[str, float]:
    """``{"split/metric": value}`` of ``model`` on ``items`` (rendered prompts) under ``suite``.

    Items need ``id``, ``prompt``, ``answer``, ``value``; teacher-forced splits also ``paraphrased_answer`` and
    ``perturbed_answer``.
    """
    ev = UnlearningEvaluator(suite, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             use_chat_template=use_chat_template, render_prompts=False)
    for split in ev.splits:
        rows = list(items.get(split, ()))
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            keys = set().union(*chunk)
            batch = {k: [r.get(k) for r in chunk] for k in keys}
            ev.update(split, batch, model, tokenizer)
    return ev.compute()


def _delta(value: float, base: float | None) -> float | None:
    if base is None or not (math.isfinite(value) and math.isfinite(base)):
        return None
    return value - base


def attack_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (attack, setting, split, metric) of an ``attack.json`` result.

    ``delta`` is the value minus the unattacked model's (``result["unattacked"]``: greedy, plain prompts) for the
    metric of the same split; sampling's ``leak_at_<k>`` is against unattacked answer accuracy (the greedy leak);
    a relearning setting ``<peft>/<model>/steps_<k>`` is against ``<peft>/<model>/steps_0`` (that model before
    the attack).
    """
    base = result.get("unattacked", {}).get("metrics", {})
    rows: list[dict[str, Any]] = []

    def add(attack: str, setting: str, metrics: Mapping[str, float], ref: Mapping[str, float] | None) -> None:
        for key, v in metrics.items():
            split, _, metric = key.rpartition("/")
            ref_metric = "answer_accuracy" if metric.startswith("leak_at_") else metric
            b = None if ref is None else ref.get(f"{split}/{ref_metric}")
            rows.append({"attack": attack, "setting": setting, "split": split, "metric": metric,
                         "value": float(v), "delta": _delta(float(v), b)})

    add("none", "greedy", base, None)
    for name, part in result.get("attacks", {}).items():
        settings = part["settings"]
        for setting, metrics in settings.items():
            ref = settings.get(setting.rsplit("/", 1)[0] + "/steps_0") if name == "relearning" else base
            add(name, setting, metrics, ref)
    return rows


#: Metrics shown in ``attack.md`` (attack.json has every metric).
TABLE_METRICS = ("answer_accuracy", "refusal_rate", "rouge_l_recall")


def render_markdown(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """The attack table in Markdown (``metrics`` and every ``leak_at_<k>``; value and Δ vs unattacked)."""
    head = "| attack | setting | split | metric | value | Δ vs unattacked |\n|---|---|---|---|---|---|\n"
    body = []
    for r in rows:
        if r["metric"] not in metrics and not r["metric"].startswith("leak_at_"):
            continue
        d = "" if r["delta"] is None else f"{r['delta']:+.3f}"
        body.append(f"| {r['attack']} | {r['setting']} | {r['split']} | {r['metric']} | "
                    f"{r['value']:.3f} | {d} |")
    return head + "\n".join(body) + "\n"
