"""The core's layers import only downward, and the package roots export what they promise.

Layers (README "Layout"; ``rerule_lightning/__init__.py``): model primitives → algorithms and evaluation
(siblings, neither imports the other) → Lightning modules → infrastructure and commands. The core never
imports ``datamodules`` or ``callbacks``, except the commands that assemble a job (``cli``, ``prepare``,
``pipeline``). Every import is counted, module-level or inside a function, ``TYPE_CHECKING`` included, and
there is no import circle anywhere in the three packages.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRIMITIVES, ALGORITHMS, EVALUATION, MODULES, COMMANDS = "primitives", "algorithms", "evaluation", "modules", "commands"
#: Rank of each layer: an import may point to a lower rank; algorithms and evaluation share one rank and
#: may not import each other.
RANK = {PRIMITIVES: 0, ALGORITHMS: 1, EVALUATION: 1, MODULES: 2, COMMANDS: 3}
LAYERS: dict[str, str] = {
    "policy": PRIMITIVES, "generation": PRIMITIVES, "logprobs": PRIMITIVES, "answers": PRIMITIVES,
    "rouge": PRIMITIVES, "prompting": PRIMITIVES, "rollout": PRIMITIVES, "guards": PRIMITIVES,
    "checkpointing": PRIMITIVES, "jsonio": PRIMITIVES,
    "grpo": ALGORITHMS, "micro_batch": ALGORITHMS, "grpo_step": ALGORITHMS, "rewards": ALGORITHMS,
    "unlearning": ALGORITHMS,
    "metrics": EVALUATION, "eval_suite": EVALUATION, "evaluator": EVALUATION,
    "sft": MODULES, "grpo_module": MODULES, "loss_module": MODULES, "eval_report": MODULES, "eval_module": MODULES,
    "tracking": COMMANDS, "interrupts": COMMANDS, "knobs": COMMANDS, "paths": COMMANDS, "validation": COMMANDS,
    "cli_errors": COMMANDS, "lightning_cli": COMMANDS, "report_rows": COMMANDS,
    "plots": COMMANDS, "report": COMMANDS, "paired": COMMANDS, "prepare": COMMANDS, "pipeline": COMMANDS, "cli": COMMANDS,
    "__main__": COMMANDS,
}
#: Core modules that may import datamodules / callbacks (they assemble a whole job).
ASSEMBLERS = {"cli", "prepare", "pipeline"}
PACKAGES = ("rerule_lightning", "callbacks", "datamodules")


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path = REPO) -> bool:
    rel = Path(*name.split("."))
    return (root / rel.with_suffix(".py")).is_file() or (root / rel / "__init__.py").is_file()


def _imports(path: Path, root: Path = REPO) -> set[str]:
    """Every project module imported by the file (``from pkg import sub`` counts as ``pkg.sub``)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if _is_module(sub, root) else base)
    return {m for m in found if m.split(".")[0] in PACKAGES and m != name}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    return {_module_name(p): _imports(p) for p in files}


def _core_key(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "rerule_lightning" and len(parts) > 1 else None


def test_every_core_module_has_a_layer() -> None:
    missing = sorted({k for m in _graph() if (k := _core_key(m)) is not None and k not in LAYERS})
    assert not missing, f"assign a layer to {missing} in tests/test_layering.py (and the README's layout)"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` (module -> imported modules) that break the layering."""
    bad = []
    for src, targets in graph.items():
        key = _core_key(src)
        if key is None:
            continue
        for dst in targets:
            dkey = _core_key(dst)
            if dkey is None:
                if dst.split(".")[0] in ("datamodules", "callbacks") and key not in ASSEMBLERS:
                    bad.append(f"{src} -> {dst} (the core does not import {dst.split('.')[0]})")
                continue
            if dkey == key:  # inside a subpackage (metrics)
                continue
            a, b = LAYERS[key], LAYERS[dkey]
            if RANK[b] > RANK[a] or (RANK[a] == RANK[b] and a != b):
                bad.append(f"{src} ({a}) -> {dst} ({b})")
    return sorted(bad)


def test_core_imports_point_down_and_never_into_datamodules_or_callbacks() -> None:
    bad = upward_imports(_graph())
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_layering_check_catches_what_it_must(tmp_path: Path) -> None:
    graph = {"rerule_lightning.rouge": {"rerule_lightning.grpo_module"},  # primitive -> module: up
             "rerule_lightning.grpo": {"rerule_lightning.evaluator"},  # algorithm -> evaluation: sideways
             "rerule_lightning.evaluator": {"datamodules.world", "rerule_lightning.rouge"},  # core -> datamodules
             "rerule_lightning.cli": {"datamodules.world", "rerule_lightning.grpo_module"},  # allowed
             "rerule_lightning.metrics.text": {"rerule_lightning.metrics.functional"}}  # allowed
    assert upward_imports(graph) == [
        "rerule_lightning.evaluator -> datamodules.world (the core does not import datamodules)",
        "rerule_lightning.grpo (algorithms) -> rerule_lightning.evaluator (evaluation)",
        "rerule_lightning.rouge (primitives) -> rerule_lightning.grpo_module (modules)",
    ]
    # the scanner sees lazy imports inside functions and resolves `from pkg import submodule`
    pkg = tmp_path / "rerule_lightning"
    (pkg / "metrics").mkdir(parents=True)
    for f in ("__init__.py", "metrics/__init__.py", "metrics/functional.py", "grpo_module.py"):
        (pkg / f).write_text("")
    src = pkg / "rouge.py"
    src.write_text("def f():\n    from rerule_lightning.grpo_module import GRPOUnlearningModule\n"
                   "from rerule_lightning.metrics import functional as F\nfrom . import grpo_module\n")
    assert _imports(src, tmp_path) == {"rerule_lightning.grpo_module", "rerule_lightning.metrics.functional"}


def test_no_import_circles() -> None:
    graph = _graph()

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # A package __init__ that re-exports its submodules, imported back by one of them, is the usual
    # `from pkg import sibling` pattern, not a circle of the code: keep only circles through two real modules.
    real = [c for c in cycles if len({x for x in c if not (REPO / Path(*x.split("."))).is_dir()}) > 1]
    assert not real, "import circles:\n" + "\n".join(" -> ".join(c) for c in real)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_imports(package: str) -> None:
    mod = importlib.import_module(package)
    assert mod.__all__, f"{package} exports nothing"
    missing = [n for n in mod.__all__ if getattr(mod, n, None) is None]
    assert not missing, f"{package}.__all__ names that do not resolve: {missing}"


def test_short_names_are_the_defining_objects() -> None:
    import callbacks
    import datamodules
    import rerule_lightning as r
    from callbacks.replay import HardCaseReplayCallback, RandomReplayCallback
    from datamodules.forget_retain import ForgetRetainDataModule
    from rerule_lightning.evaluator import UnlearningEvaluator
    from rerule_lightning.grpo_module import GRPOUnlearningModule
    from rerule_lightning.prepare import prepare
    from rerule_lightning.report import report

    assert r.GRPOUnlearningModule is GRPOUnlearningModule and r.UnlearningEvaluator is UnlearningEvaluator
    assert r.prepare_embedded is prepare and r.report_runs is report
    assert callbacks.HardCaseReplayCallback is HardCaseReplayCallback
    assert callbacks.RandomReplayCallback is RandomReplayCallback
    assert datamodules.ForgetRetainDataModule is ForgetRetainDataModule
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        r.Nope  # noqa: B018


def test_import_of_the_root_stays_light() -> None:
    # Lazy exports: importing the package must not pull in torch or Lightning.
    code = "import sys, rerule_lightning, datamodules; print(sorted(m for m in ('torch', 'lightning', 'datasets') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
