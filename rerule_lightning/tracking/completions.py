"""Sampled completions in MLflow: what a run actually generated, as table artifacts (``mlflow.log_table``).

:class:`CompletionsTable` (on by default in ``rerule fit / validate / test``: the CLI's trainer callbacks):

* every ``every_n_steps`` GRPO steps, a table of ``num_groups`` rollout groups of the step (the first ones of its
  balanced batch, a fixed choice: the batch of a step is a pure function of the seed and the step), one row per
  completion: ``step``, ``prompt``, ``label``, ``kind``, ``completion``, ``reward`` (the weighted sum), one
  ``reward/<name>`` column per reward function and ``advantage``, as ``completions/step_<step>.json``;
* after each validation / test pass, per split, the first ``num_eval_items`` greedy generations (``prompt``,
  ``answer``, ``prediction``) as ``generations/<stage>_step_<step>_<split>.json``.

Pure row building (:func:`completion_rows`, :func:`generation_rows`) is separate from logging; a tracking outage
never stops the run (a warning, the table is skipped).
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L

from rerule_lightning.primitives.ranges import Count, Steps, range_errors

log = logging.getLogger(__name__)


def _clip(text: Any, limit: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def completion_rows(groups: Sequence[Any], prompts: Sequence[str] | None,
                    per_function: Mapping[str, Sequence[float | None]] | None, g: int, step: int, num_groups: int,
                    max_chars: int = 1000) -> dict[str, list[Any]]:
    """Columns of the completions table for the first ``num_groups`` groups of one step.

    Args:
        groups: The step's fresh :class:`~rerule_lightning.primitives.rollout.RolloutGroup` s, in batch order.
        prompts: The batch's prompt texts, in the same order (``None``: the groups' prompt ids).
        per_function: Each reward's values over the step's ``B*G`` completions (group-major), or ``None``.
        g: Completions per group.
        step: The step the groups were sampled at.
        num_groups: How many groups to keep.
        max_chars: Longer texts are cut (with an ellipsis).
    """
    cols: dict[str, list[Any]] = {k: [] for k in ("step", "prompt", "label", "kind", "completion", "reward",
                                                  "advantage")}
    names = list(per_function or {})
    for name in names:
        cols[f"reward/{name}"] = []
    for gi, grp in enumerate(groups[:num_groups]):
        for j, text in enumerate(grp.completions):
            cols["step"].append(int(step))
            cols["prompt"].append(_clip(prompts[gi] if prompts is not None else grp.prompt_id, max_chars))
            cols["label"].append(grp.label)
            cols["kind"].append(getattr(grp, "kind", None) or grp.label)
            cols["completion"].append(_clip(text, max_chars))
            cols["reward"].append(float(grp.rewards[j]))
            cols["advantage"].append(float(grp.advantages[j]))
            for name in names:
                v = per_function[name][gi * g + j]
                cols[f"reward/{name}"].append(None if v is None else float(v))
    return cols


def generation_rows(records: Sequence[Mapping[str, Any]], split: str, num_items: int,
                    max_chars: int = 1000) -> dict[str, list[Any]]:
    """Columns of one split's generations table: the first ``num_items`` records of ``split`` with a prediction."""
    rows = [r for r in records if r.get("split") == split and r.get("prediction") is not None][:num_items]
    return {"id": [str(r.get("id")) for r in rows], "prompt": [_clip(r.get("prompt"), max_chars) for r in rows],
            "answer": [_clip(r.get("answer"), max_chars) for r in rows],
            "prediction": [_clip(r.get("prediction"), max_chars) for r in rows]}


def log_table(trainer: L.Trainer, data: dict[str, list[Any]], artifact_file: str) -> int:
    """``MlflowClient.log_table`` on every MLflow logger of ``trainer`` (rank zero); returns how many took it."""
    from lightning.pytorch.loggers import MLFlowLogger

    done = 0
    if not trainer.is_global_zero or not data or not next(iter(data.values())):
        return 0
    for logger in trainer.loggers:
        if not isinstance(logger, MLFlowLogger):
            continue
        try:
            logger.experiment.log_table(run_id=logger.run_id, data=data, artifact_file=artifact_file)
            done += 1
        except Exception as e:  # noqa: BLE001 (a tracking outage must not stop training)
            log.warning("could not log %s to MLflow: %s: %s", artifact_file, type(e).__name__, e)
    return done


class CompletionsTable(L.Callback):
    """Log sampled GRPO completions every ``every_n_steps`` steps and greedy evaluation generations per split.

    Args:
        every_n_steps: Log the rollouts of every this many steps (the step the groups were sampled at, 0 first);
            0 turns training tables off.
        num_groups: Rollout groups per table (each with its G completions).
        num_eval_items: Generations per split per evaluation pass; 0 turns evaluation tables off.
        max_chars: Texts longer than this are cut.
    """

    def __init__(self, every_n_steps: Steps = 10, num_groups: Steps = 4, num_eval_items: Steps = 16,
                 max_chars: Count = 1000) -> None:
        if errors := range_errors(type(self), locals()):
            raise ValueError("CompletionsTable: " + "; ".join(errors))
        self.every_n_steps, self.num_groups = every_n_steps, num_groups
        self.num_eval_items, self.max_chars = num_eval_items, max_chars

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        groups = outputs.get("groups") if isinstance(outputs, Mapping) else None
        if not groups or not self.every_n_steps or not self.num_groups:
            return
        step = int(groups[0].step)
        if step % self.every_n_steps:
            return
        g = len(groups[0].completions)
        per = outputs.get("rewards_per_function")
        per = per if per and all(len(v) == len(groups) * g for v in per.values()) else None  # fill left some out
        prompts = batch.get("prompt") if isinstance(batch, Mapping) else None
        prompts = prompts if prompts is not None and len(prompts) == len(groups) else None
        rows = completion_rows(groups, prompts, per, g, step, self.num_groups, self.max_chars)
        log_table(trainer, rows, f"completions/step_{step:06d}.json")

    def _eval_tables(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ev = getattr(pl_module, "evaluator", None)
        if ev is None or not self.num_eval_items or trainer.sanity_checking:
            return
        records = ev.per_item()  # this rank's records (rank zero logs its own sample)
        for split in ev.splits:
            rows = generation_rows(records, split, self.num_eval_items, self.max_chars)
            log_table(trainer, rows, f"generations/{stage}_step_{trainer.global_step:06d}_{split}.json")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_tables(trainer, pl_module, "validation")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_tables(trainer, pl_module, "test")


__all__ = ["CompletionsTable", "completion_rows", "generation_rows", "log_table"]
