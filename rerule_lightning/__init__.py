"""rerule-lightning: reinforcement unlearning of LLMs (RULE and ReRULE) with PyTorch Lightning.

The main classes and functions are importable from here (``from rerule_lightning import
GRPOUnlearningModule``) and usable as short ``class_path`` values in YAML (``rerule_lightning.GRPOUnlearningModule``).
They are loaded lazily, on first access, so ``import rerule_lightning`` stays cheap (it imports neither torch nor
Lightning).

The core is layered, one folder a layer; each layer imports only from the layers below it
(``tests/test_layering.py``):

1. :mod:`~rerule_lightning.primitives`: policy building, generation, log-probs, answers, ROUGE, prompting,
   rollout groups, guards, checkpointing;
2. :mod:`~rerule_lightning.rl` (advantages, losses, micro-batching, the step, rewards),
   :mod:`~rerule_lightning.unlearning` (the baselines' losses) and :mod:`~rerule_lightning.evaluation`
   (metrics, suites, the evaluator): siblings that do not import each other;
3. :mod:`~rerule_lightning.modules`: the LightningModules;
4. :mod:`~rerule_lightning.tracking` (MLflow, completions tables, report rows and plots, paired and frontier
   statistics);
5. :mod:`~rerule_lightning.cli` (the ``rerule`` command, preflight, errors, signals, prepare / demo / report /
   attack), the only layer that imports ``datamodules`` and ``callbacks``.

Module paths from before the layout in folders (``rerule_lightning.grpo_module``, ``rerule_lightning.policy``,
...) still import, as aliases of the moved modules (the same module objects), so a user's YAML ``class_path``
or import written against them keeps working: :data:`MOVED` lists them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module (relative to this package) that defines it, as ``module`` or ``module:attribute``
#: (an alias; ``prepare``, ``report`` and ``attack`` are not exported under their own names, which the submodules hold).
_EXPORTS: dict[str, str] = {
    # model primitives
    "PolicyConfig": "primitives.policy", "build_policy": "primitives.policy", "load_tokenizer": "primitives.policy",
    "save_policy": "primitives.policy", "greedy_generate": "primitives.generation",
    "ExportConfig": "primitives.export", "write_export": "primitives.export",
    "token_logprobs": "primitives.logprobs", "is_refusal": "primitives.answers", "answer_correct": "primitives.answers",
    "REFUSAL_PATTERNS": "primitives.answers", "rouge_l": "primitives.rouge", "rouge_l_recall": "primitives.rouge",
    "format_prompt": "primitives.prompting", "RolloutGroup": "primitives.rollout", "NonFiniteError": "primitives.guards",
    "Range": "primitives.ranges", "range_errors": "primitives.ranges",
    # algorithms
    "group_advantages": "rl.grpo", "grpo_loss": "rl.grpo", "clipped_surrogate": "rl.grpo",
    "off_policy_loss": "rl.grpo", "k3_kl": "rl.grpo", "aggregate_loss": "rl.grpo", "unlearning": "unlearning",
    "rule_reward": "rl.rewards", "forget_reward": "rl.rewards", "boundary_reward": "rl.rewards",
    "refusal_reward": "rl.rewards", "get_reward_fn": "rl.rewards", "REWARD_FUNCTIONS": "rl.rewards",
    "RewardContract": "rl.reward_contract",
    # evaluation
    "UnlearningEvaluator": "evaluation.evaluator", "EvalSuite": "evaluation.suite", "SplitSpec": "evaluation.suite",
    "metrics": "evaluation.metrics", "OutputClassRate": "evaluation.metrics.outputs",
    "output_class": "evaluation.metrics.outputs",
    "attacks": "evaluation.attacks",
    # Lightning modules
    "GRPOUnlearningModule": "modules.grpo", "SFTModule": "modules.sft", "TinyLlamaConfig": "modules.sft",
    "EvalModule": "modules.eval", "ReferenceItems": "modules.eval_hooks", "compute_reference": "modules.eval_hooks",
    "LossUnlearningModule": "modules.loss",
    # infrastructure and commands
    "ResilientMLFlowLogger": "tracking.logger", "CompletionsTable": "tracking.completions",
    "Constraint": "tracking.frontier", "frontier_area": "tracking.frontier",
    "prepare_embedded": "cli.prepare:prepare",
    "report_runs": "cli.report:report", "demo_main": "cli.pipeline",
    "attack_model": "cli.attack:attack", "SamplingAttack": "cli.attack_config",
    "QuantizationAttack": "cli.attack_config", "RelearningAttack": "cli.attack_config",
    "AdversarialAttack": "cli.attack_config",
}

#: Module paths before the layout in folders -> where the module lives now (both under this package).
MOVED: dict[str, str] = {
    "policy": "primitives.policy", "generation": "primitives.generation", "logprobs": "primitives.logprobs",
    "answers": "primitives.answers", "rouge": "primitives.rouge", "prompting": "primitives.prompting",
    "rollout": "primitives.rollout", "guards": "primitives.guards", "checkpointing": "primitives.checkpointing",
    "jsonio": "primitives.jsonio",
    "grpo": "rl.grpo", "micro_batch": "rl.micro_batch", "grpo_step": "rl.step", "rewards": "rl.rewards",
    "metrics": "evaluation.metrics", "eval_suite": "evaluation.suite", "evaluator": "evaluation.evaluator",
    "sft": "modules.sft", "grpo_module": "modules.grpo", "loss_module": "modules.loss",
    "eval_report": "modules.eval_hooks", "eval_module": "modules.eval",
    "report_rows": "tracking.report_rows", "plots": "tracking.plots", "paired": "tracking.paired",
    "validation": "cli.validation", "knobs": "cli.knobs", "paths": "cli.paths", "interrupts": "cli.interrupts",
    "cli_errors": "cli.errors", "lightning_cli": "cli.lightning_cli", "prepare": "cli.prepare",
    "pipeline": "cli.pipeline", "report": "cli.report",
}
# Not here: ``tracking`` and ``cli`` kept their names, as packages that forward the old modules' names lazily
# (``rerule_lightning.tracking.ResilientMLFlowLogger``, ``rerule_lightning.cli.main``).

__all__ = ["__version__", *sorted(_EXPORTS)]


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module path as the module now at ``target`` (the same object, so classes are identical)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:  # already executed under its new name
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``rerule_lightning.<old>[.<sub>]`` for every entry of :data:`MOVED`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        head, _, rest = fullname.partition(".")
        if head != __name__ or not rest:
            return None
        first, _, tail = rest.partition(".")
        new = MOVED.get(first)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(f"{__name__}.{new}" + (f".{tail}" if tail else "")))


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finder: a submodule of an aliased package
    # (``rerule_lightning.metrics.functional``) would otherwise load a second time under its old name


def forwarded_names(package: str, package_file: str, target: str) -> Any:
    """A module ``__getattr__`` for ``package`` that forwards unknown names to the module ``target``, lazily.

    ``rerule_lightning.cli`` and ``rerule_lightning.tracking`` were modules before the layout in folders and are
    packages now: their old names (``rerule_lightning.cli.main``, ``rerule_lightning.tracking.ResilientMLFlowLogger``)
    keep working through this, and importing either package stays cheap. A name that is a submodule's file is left
    to the import system."""
    from pathlib import Path

    here = Path(package_file).parent

    def __getattr__(name: str) -> Any:
        if name.startswith("__") or (here / f"{name}.py").exists():
            raise AttributeError(name)  # a submodule: the import system loads it
        try:
            return getattr(importlib.import_module(target), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rerule_lightning' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    mod = importlib.import_module(f"rerule_lightning.{module}")
    value = mod if name == module.rpartition(".")[2] and not attr else getattr(mod, attr or name)
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
