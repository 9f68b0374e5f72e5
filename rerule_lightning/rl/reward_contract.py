"""TRL's reward-function contract: how the GRPO module calls every reward, and the check it passes before training.

Every reward, the project's and a user's alike, is called exactly as TRL's ``GRPOTrainer`` calls a reward
function, by keyword::

    fn(prompts=[...], completions=[...], completion_ids=[[int, ...], ...], trainer_state=state, **columns)

with one entry per completion (each prompt repeated G times, group-major), ``completion_ids`` the sampled token
ids without padding, ``trainer_state`` a :class:`RewardTrainerState` (``global_step``, ``max_steps``, ``epoch``;
TRL passes its ``TrainerState``, which has the same fields) and ``columns`` the datamodule's batch columns under
their own names (``id``, ``question``, ``label``, ``kind``, ``reference``, ``target``, ``value``), as TRL passes
the dataset's columns. A function returns one ``float`` (or ``int``) per completion, or ``None`` where it does not
apply (TRL's convention). So a reward from TRL's documentation, ``def reward_len(completions, **kwargs)``, runs
unchanged.

The project's registered rewards (:data:`rerule_lightning.rl.rewards.REWARD_FUNCTIONS`) are pure functions with
plural column names; :class:`ProjectReward` adapts them to the same call (``label`` -> ``labels``, ...) and binds
the module's ``target_aware`` / ``recall_threshold``.

Several rewards are summed with weights over the ones that apply (TRL's ``nansum``); each one's values are kept,
so the module logs ``train/rewards/<name>/mean`` and ``/std`` per function, as TRL does
(:func:`per_function_metrics`).

:meth:`RewardContract.preflight` binds the call to every function's signature and calls each once on a probe
batch, refusing (one line naming the reward) a signature that cannot take the call or a result of the wrong count
or type: before the model is loaded or a tracking run created.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rerule_lightning.rl.rewards import REWARD_FUNCTIONS, get_reward_fn

#: Batch keys that are not data columns (the prompt is passed as ``prompts``; the rest is replay plumbing).
NOT_COLUMNS = ("prompt", "replay", "replay_options")
#: The project's plural keyword for each batch column its rewards read.
PROJECT_COLUMNS = {"label": "labels", "reference": "references", "value": "values", "target": "targets"}


@dataclass(frozen=True)
class RewardTrainerState:
    """What TRL's ``trainer_state`` tells a reward: where the run is.

    Attributes:
        global_step: Optimizer steps taken before this rollout.
        max_steps: The run's ``trainer.max_steps`` (``-1`` when unbounded).
        epoch: The current epoch.
    """

    global_step: int = 0
    max_steps: int = -1
    epoch: float = 0.0


class ProjectReward:
    """A registered project reward behind TRL's keyword call.

    Args:
        fn: A function of :data:`~rerule_lightning.rl.rewards.REWARD_FUNCTIONS`
            (``fn(prompts, completions, *, labels=, references=, values=, targets=, ...)``).
        settings: Module settings passed to it (``target_aware``, ``recall_threshold``), unless the registered
            entry fixes them itself (e.g. ``rule_target_aware``).
    """

    def __init__(self, fn: Callable[..., list[float | None]], settings: Mapping[str, Any] | None = None) -> None:
        fixed = getattr(fn, "keywords", None) or {}
        self.fn = fn
        self.settings = {k: v for k, v in (settings or {}).items() if k not in fixed}
        self.__name__ = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", "reward"))

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: Any = None,
                 trainer_state: Any = None, **columns: Any) -> list[float | None]:
        """The wrapped reward on the batch columns, renamed to the project's plural keywords."""
        kw = {PROJECT_COLUMNS.get(k, k): v for k, v in columns.items()}
        return self.fn(prompts, completions, **kw, **self.settings)


def reward_name(entry: str, fn: Callable[..., Any]) -> str:
    """The metric name of a reward: its registry name, else the function's ``__name__`` (``[a-z0-9_]``)."""
    raw = entry if entry in REWARD_FUNCTIONS else getattr(fn, "__name__", None) or entry.rpartition(":")[2]
    return re.sub(r"[^a-z0-9_]", "_", str(raw).lower()) or "reward"


def completion_id_lists(completion_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """``completion_ids`` as TRL passes them: per completion, its token ids up to its mask's end (no padding).

    Args:
        completion_ids: ``[N, T]`` sampled ids.
        mask: ``[N, T]`` completion mask (1 up to and including the stop token).
    """
    lengths = mask.sum(1).tolist()  # [N]
    rows = completion_ids.tolist()  # [N, T]
    return [row[: int(n)] for row, n in zip(rows, lengths)]


def batch_columns(batch: Mapping[str, Any], repeat: int) -> dict[str, list[Any]]:
    """The batch's data columns under their own names, each item repeated ``repeat`` times (group-major)."""
    return {k: [x for x in v for _ in range(repeat)] for k, v in batch.items()
            if k not in NOT_COLUMNS and isinstance(v, (list, tuple))}


def result_error(name: str, values: Any, n: int) -> str | None:
    """Why ``values`` is not a valid reward result for ``n`` completions (``None`` when it is)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return (f"reward {name!r} returned {type(values).__name__}: expected a list of one float (or None) per "
                "completion")
    if len(values) != n:
        return f"reward {name!r} returned {len(values)} values for {n} completions: expected one per completion"
    for i, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            return (f"reward {name!r} returned {type(v).__name__} {v!r} for completion {i}: expected a float, "
                    "an int or None")
    return None


class RewardContract:
    """The rewards of a GRPO run, called with TRL's contract and combined with weights.

    Args:
        reward: A registered reward name or an import path ``package.module:function``, or a list of them.
        weights: One weight per reward (default: 1 each).
        settings: Module settings the project's registered rewards take (``target_aware``, ``recall_threshold``).

    Raises:
        ValueError: For an unresolvable entry (naming it) or a weight count that does not match.
    """

    def __init__(self, reward: str | Sequence[str], weights: Sequence[float] | None = None,
                 settings: Mapping[str, Any] | None = None) -> None:
        entries = [reward] if isinstance(reward, str) else list(reward)
        if not entries:
            raise ValueError("reward: give at least one reward")
        weights = [1.0] * len(entries) if weights is None else [float(w) for w in weights]
        if len(weights) != len(entries):
            raise ValueError(f"reward_weights has {len(weights)} weights but there are {len(entries)} rewards")
        self.entries, self.weights = entries, weights
        self.fns: list[Callable[..., Any]] = []
        self.names: list[str] = []
        for entry in entries:
            fn = get_reward_fn(entry)
            fn = ProjectReward(fn, settings) if entry in REWARD_FUNCTIONS else fn
            name = reward_name(entry, fn)
            while name in self.names:  # the same function twice (e.g. two weights): keep the keys apart
                name += "_"
            self.fns.append(fn)
            self.names.append(name)

    def score(self, **call: Any) -> tuple[list[float | None], dict[str, list[float | None]]]:
        """Every reward on one call (TRL's keywords): the weighted sum per completion (``None`` where no reward
        applies) and each reward's own values by name.

        Raises:
            ValueError: A result of the wrong count or type, naming the reward.
        """
        n = len(call["completions"])
        total: list[float | None] = [None] * n
        per: dict[str, list[float | None]] = {}
        for fn, w, name in zip(self.fns, self.weights, self.names):
            values = fn(**call)
            problem = result_error(name, values, n)
            if problem:
                raise ValueError(problem)
            per[name] = [None if v is None else float(v) for v in values]
            for i, v in enumerate(per[name]):
                if v is not None:
                    total[i] = (total[i] or 0.0) + w * v
        return total, per

    def __call__(self, **call: Any) -> list[float | None]:
        """The weighted sum per completion (see :meth:`score`)."""
        return self.score(**call)[0]

    def preflight(self, call: Mapping[str, Any]) -> None:
        """Refuse, before training, a reward that cannot take TRL's call or returns a wrong result.

        Args:
            call: A probe call with every keyword a training step passes (:func:`probe_call`).

        Raises:
            ValueError: One line naming the reward and what is wrong.
        """
        n = len(call["completions"])
        for fn, entry, name in zip(self.fns, self.entries, self.names):
            what = f"reward {entry!r}" if entry == name else f"reward {entry!r} ({name})"
            try:
                inspect.signature(fn).bind(**call)
            except TypeError as e:
                raise ValueError(f"{what} cannot take TRL's reward call ({', '.join(f'{k}=' for k in call)}): "
                                 f"{e}; accept the columns you do not use with **kwargs") from None
            except ValueError:  # no signature to inspect (a builtin): the probe call decides
                pass
            try:
                values = fn(**call)
            except Exception as e:  # noqa: BLE001 (the user's code, reported as one line)
                raise ValueError(f"{what} raised {type(e).__name__} on a probe batch: {e}") from None
            problem = result_error(name, values, n)
            if problem:
                raise ValueError(problem.replace(f"reward {name!r}", what, 1) + " (probe batch)")


def probe_call(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
               encode: Callable[[str], list[int]]) -> dict[str, Any]:
    """A reward call on a few pool rows, with each row's reference answer (else a refusal) as its completion.

    Args:
        rows: Prompt rows (each with ``prompt`` and the batch ``columns``).
        columns: The batch's column names (the datamodule's, e.g. ``PROMPT_COLUMNS``).
        encode: Text -> token ids (the tokenizer, without special tokens).
    """
    completions = [str(r.get("reference") or "I'm sorry, I can't answer that.") for r in rows]
    call: dict[str, Any] = {"prompts": [str(r.get("prompt") or r.get("question") or "") for r in rows],
                            "completions": completions, "completion_ids": [encode(c) for c in completions],
                            "trainer_state": RewardTrainerState()}
    call.update({c: [r.get(c) for r in rows] for c in columns if c not in NOT_COLUMNS})
    return call


def _nanstd(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def per_function_metrics(per: Mapping[str, Sequence[float | None]]) -> dict[str, torch.Tensor]:
    """``train/rewards/<name>/mean`` and ``/std`` (Bessel-corrected, TRL's ``nanstd``) over the completions each
    reward applies to; a reward that applied to none logs nothing that step."""
    out: dict[str, torch.Tensor] = {}
    for name, values in per.items():
        vals = [float(v) for v in values if v is not None]
        if vals:
            out[f"train/rewards/{name}/mean"] = torch.tensor(sum(vals) / len(vals))
            out[f"train/rewards/{name}/std"] = torch.tensor(_nanstd(vals))
    return out


def score_rewards(fn: Callable[..., Any], call: Mapping[str, Any]
                  ) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """``fn.score(**call)`` for a :class:`RewardContract`; any other callable (a test's stand-in) as one reward."""
    if isinstance(fn, RewardContract):
        return fn.score(**call)
    return list(fn(**call)), {}


__all__ = ["NOT_COLUMNS", "PROJECT_COLUMNS", "ProjectReward", "RewardContract", "RewardTrainerState",
           "batch_columns", "completion_id_lists", "per_function_metrics", "probe_call", "result_error",
           "reward_name", "score_rewards"]
