"""Every third-party package the code imports is declared in ``pyproject.toml`` (with a floor)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rerule_lightning", "callbacks", "datamodules")
#: import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "rouge_score": "rouge-score", "huggingface_hub": "huggingface_hub"}


def imported_top_levels() -> set[str]:
    names: set[str] = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES and n != "__future__"}


def test_every_imported_package_is_declared_with_a_floor() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {}
    for d in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)", d)
        assert m, f"{d!r}: declare a floor with >="
        declared[m.group(1).lower().replace("-", "_")] = m.group(3)
    missing = sorted(n for n in imported_top_levels()
                     if DIST.get(n, n).lower().replace("-", "_") not in declared)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert {"accelerate", "numpy", "pyarrow", "pyyaml", "nltk"} <= set(declared)
