"""The core's layers import only downward, and the package roots export what they promise.

A core module's layer is its folder (README "Layout"; ``rerule_lightning/__init__.py``): ``primitives`` →
``rl``, ``unlearning`` (algorithms) and ``evaluation`` (siblings: no folder of one rank imports another folder of
the same rank) → ``modules`` → ``tracking`` → ``cli``. The core never imports ``datamodules`` or ``callbacks``,
except the command layer (``cli/``), which assembles whole jobs. Every import is counted, module-level or inside a
function, ``TYPE_CHECKING`` included, and there is no import circle anywhere in the three packages.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Rank of each layer folder of ``rerule_lightning/``: an import may point into its own folder or a lower rank.
RANK: dict[str, int] = {"primitives": 0, "rl": 1, "unlearning": 1, "evaluation": 1, "modules": 2, "tracking": 3,
                        "cli": 4}
#: The one layer that may import datamodules / callbacks (it assembles whole jobs).
ASSEMBLERS = {"cli"}
#: Files at the package root, outside every layer: the lazy export facade and ``python -m rerule_lightning``.
ROOT_FILES = {"__main__": "cli"}
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


def _layer(module: str) -> str | None:
    """The layer (folder) of a core module; ``None`` outside the core or for the package root itself."""
    parts = module.split(".")
    if parts[0] != "rerule_lightning" or len(parts) == 1:
        return None
    return ROOT_FILES.get(parts[1], parts[1]) if len(parts) == 2 else parts[1]


def unplaced(modules: list[str]) -> list[str]:
    """Core modules that are not inside a layer folder of :data:`RANK`."""
    return sorted(m for m in modules if (layer := _layer(m)) is not None and layer not in RANK)


def test_every_core_module_sits_in_a_layer_folder() -> None:
    missing = unplaced(list(_graph()))
    assert not missing, f"move {missing} into a layer folder, or add the folder to RANK here (and the README's layout)"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` (module -> imported modules) that break the layering."""
    bad = []
    for src, targets in graph.items():
        a = _layer(src)
        if a is None:
            continue
        for dst in targets:
            b = _layer(dst)
            if b is None:
                if dst.split(".")[0] in ("datamodules", "callbacks") and a not in ASSEMBLERS:
                    bad.append(f"{src} -> {dst} (the core does not import {dst.split('.')[0]})")
                continue
            if a == b:
                continue
            if RANK[b] >= RANK[a]:
                bad.append(f"{src} ({a}) -> {dst} ({b})")
    return sorted(bad)


def test_core_imports_point_down_and_never_into_datamodules_or_callbacks() -> None:
    bad = upward_imports(_graph())
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_layering_check_catches_what_it_must(tmp_path: Path) -> None:
    graph = {"rerule_lightning.primitives.rouge": {"rerule_lightning.modules.grpo"},  # primitive -> module: up
             "rerule_lightning.rl.grpo": {"rerule_lightning.evaluation.evaluator"},  # same rank, other folder
             "rerule_lightning.unlearning.losses": {"rerule_lightning.rl.grpo"},  # algorithms siblings too
             "rerule_lightning.evaluation.evaluator": {"datamodules.world",  # core -> datamodules
                                                        "rerule_lightning.primitives.rouge"},  # down: allowed
             "rerule_lightning.tracking.plots": {"rerule_lightning.cli.report"},  # tracking -> cli: up
             "rerule_lightning.cli.prepare": {"datamodules.world", "rerule_lightning.modules.sft"},  # allowed
             "rerule_lightning.__main__": {"rerule_lightning.cli.commands"},  # the root file sits with cli
             "rerule_lightning.evaluation.metrics.text": {"rerule_lightning.evaluation.metrics.functional"}}
    assert upward_imports(graph) == [
        "rerule_lightning.evaluation.evaluator -> datamodules.world (the core does not import datamodules)",
        "rerule_lightning.primitives.rouge (primitives) -> rerule_lightning.modules.grpo (modules)",
        "rerule_lightning.rl.grpo (rl) -> rerule_lightning.evaluation.evaluator (evaluation)",
        "rerule_lightning.tracking.plots (tracking) -> rerule_lightning.cli.report (cli)",
        "rerule_lightning.unlearning.losses (unlearning) -> rerule_lightning.rl.grpo (rl)",
    ]
    # a module at the package root or in a folder that is no layer is reported; the root facade is not
    assert unplaced(["rerule_lightning", "rerule_lightning.__main__", "rerule_lightning.grpo_module",
                     "rerule_lightning.misc.helpers", "rerule_lightning.rl.grpo", "datamodules.world"]) == [
        "rerule_lightning.grpo_module", "rerule_lightning.misc.helpers"]
    # the scanner sees lazy imports inside functions and resolves `from pkg import submodule`
    pkg = tmp_path / "rerule_lightning"
    (pkg / "evaluation" / "metrics").mkdir(parents=True)
    (pkg / "primitives").mkdir()
    (pkg / "modules").mkdir()
    for f in ("__init__.py", "evaluation/__init__.py", "evaluation/metrics/__init__.py",
              "evaluation/metrics/functional.py", "modules/__init__.py", "modules/grpo.py", "primitives/__init__.py"):
        (pkg / f).write_text("")
    src = pkg / "primitives" / "rouge.py"
    src.write_text("def f():\n    from rerule_lightning.modules.grpo import GRPOUnlearningModule\n"
                   "from rerule_lightning.evaluation.metrics import functional as F\nfrom ..modules import grpo\n")
    assert _imports(src, tmp_path) == {"rerule_lightning.modules.grpo",
                                       "rerule_lightning.evaluation.metrics.functional"}


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
    from rerule_lightning.cli.prepare import prepare
    from rerule_lightning.cli.report import report
    from rerule_lightning.evaluation.evaluator import UnlearningEvaluator
    from rerule_lightning.modules.grpo import GRPOUnlearningModule

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
