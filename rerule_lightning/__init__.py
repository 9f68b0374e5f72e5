"""rerule-lightning: reinforcement unlearning of LLMs (RULE and ReRULE) with PyTorch Lightning.

The main classes and functions are importable from here (``from rerule_lightning import
GRPOUnlearningModule``) and usable as short ``class_path`` values in YAML (``rerule_lightning.GRPOUnlearningModule``).
They are loaded lazily, on first access, so ``import rerule_lightning`` stays as cheap as before (it imports
neither torch nor Lightning).

The core is layered; each layer imports only from the layers below it (``tests/test_layering.py``):

1. model primitives: ``policy``, ``generation``, ``logprobs``, ``answers`` (refusal detection, fact matching),
   ``rouge``, ``prompting``, ``rollout``, ``guards``, ``checkpointing``, ``jsonio``;
2. algorithms (``grpo``, ``micro_batch``, ``grpo_step``, ``rewards``, ``unlearning``: the baselines' losses) and
   evaluation (``metrics``, ``eval_suite``, ``evaluator``), siblings
   that do not import each other;
3. Lightning modules: ``sft``, ``grpo_module``, ``loss_module`` (the baselines), ``eval_report`` (evaluation
   hooks), ``eval_module``;
4. infrastructure and commands: ``tracking``, ``validation``, ``knobs`` (numeric ranges), ``paths`` (path
   preflight), ``interrupts`` (signal endings), ``cli_errors``, ``lightning_cli``, ``report_rows``, ``plots``, ``report``,
   ``prepare``, ``pipeline``, ``cli``, ``__main__``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module (relative to this package) that defines it, as ``module`` or ``module:attribute``
#: (an alias; ``prepare`` and ``report`` are not exported under their own names, which the submodules hold).
_EXPORTS: dict[str, str] = {
    # model primitives
    "PolicyConfig": "policy", "build_policy": "policy", "load_tokenizer": "policy", "save_policy": "policy",
    "greedy_generate": "generation", "token_logprobs": "logprobs",
    "is_refusal": "answers", "answer_correct": "answers", "REFUSAL_PATTERNS": "answers",
    "rouge_l": "rouge", "rouge_l_recall": "rouge", "format_prompt": "prompting", "RolloutGroup": "rollout",
    "NonFiniteError": "guards",
    # algorithms
    "group_advantages": "grpo", "grpo_loss": "grpo", "clipped_surrogate": "grpo", "off_policy_loss": "grpo",
    "k3_kl": "grpo", "aggregate_loss": "grpo", "unlearning": "unlearning",
    "rule_reward": "rewards", "forget_reward": "rewards", "boundary_reward": "rewards",
    "refusal_reward": "rewards", "get_reward_fn": "rewards", "REWARD_FUNCTIONS": "rewards",
    # evaluation
    "UnlearningEvaluator": "evaluator", "EvalSuite": "eval_suite", "SplitSpec": "eval_suite",
    "metrics": "metrics",
    # Lightning modules
    "GRPOUnlearningModule": "grpo_module", "SFTModule": "sft", "TinyLlamaConfig": "sft", "EvalModule": "eval_module",
    "ReferenceItems": "eval_report", "compute_reference": "eval_report", "LossUnlearningModule": "loss_module",
    # infrastructure and commands
    "ResilientMLFlowLogger": "tracking", "prepare_embedded": "prepare:prepare", "report_runs": "report:report",
    "demo_main": "pipeline",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rerule_lightning' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    mod = importlib.import_module(f"rerule_lightning.{module}")
    value = mod if name == module else getattr(mod, attr or name)
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
