"""docs/ARCHITECTURE.md names real files and functions: every ``path.py`` and ``path.py:name`` (``name`` a function,
class, ``Class.method`` or module-level constant) it cites in backticks exists, and every file of a layer folder is
listed, so the walk-through cannot drift from the code."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
REF = re.compile(r"`((?:[\w]+/)+[\w]+\.py)(?::([\w.]+))?`")


def defined_names(tree: ast.Module) -> set[str]:
    """``name`` and ``Class.method`` for every top-level def / class / assignment of a module."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_a_reference_check_catches_a_wrong_name() -> None:
    tree = ast.parse("class A:\n    def f(self): ...\ndef g(): ...\nX = 1\n")
    assert defined_names(tree) == {"A", "A.f", "g", "X"}
    assert REF.findall("`a/b.py:A.f` and `a/c.py`, not `c.py`") == [("a/b.py", "A.f"), ("a/c.py", "")]


def test_every_cited_file_and_name_exists() -> None:
    refs = REF.findall(DOC.read_text(encoding="utf-8"))
    assert len(refs) > 100, "the walk-through should cite the code it describes"
    missing = []
    for path, name in refs:
        file = REPO / path
        if not file.is_file():
            missing.append(path)
        elif name and name not in defined_names(ast.parse(file.read_text(encoding="utf-8"))):
            missing.append(f"{path}:{name}")
    assert not missing, f"docs/ARCHITECTURE.md cites what does not exist: {sorted(set(missing))}"


def test_every_file_of_a_layer_folder_is_listed() -> None:
    cited = {path for path, _ in REF.findall(DOC.read_text(encoding="utf-8"))}
    files = [p for root in ("rerule_lightning", "callbacks", "datamodules") for p in (REPO / root).rglob("*.py")]
    unlisted = sorted(str(p.relative_to(REPO)) for p in files
                      if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(REPO)) not in cited)
    assert not unlisted, f"files missing from docs/ARCHITECTURE.md: {unlisted}"
