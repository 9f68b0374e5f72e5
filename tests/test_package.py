"""Packaging: the generic package names resolve to this repo, and the ``rerule`` console script works."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("callbacks", "datamodules", "rerule_lightning")


def _script(name: str) -> Path:
    return Path(sysconfig.get_path("scripts")) / name


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_inside_repo(name: str) -> None:
    mod = __import__(name)
    path = Path(mod.__file__).resolve()
    assert path.is_relative_to(REPO), f"{name} imported from {path}, not from {REPO}"
    assert path == REPO / name / "__init__.py"


def test_packages_resolve_inside_repo_from_another_directory(tmp_path: Path) -> None:
    # From an unrelated working directory, only the installed package metadata can find them: a
    # site-packages module named `callbacks` or `datamodules` must not shadow ours.
    code = "import sys, callbacks, datamodules, rerule_lightning as r; print(callbacks.__file__); " \
           "print(datamodules.__file__); print(r.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert [Path(p).resolve() for p in out] == [REPO / n / "__init__.py" for n in PACKAGES]


def test_console_script_lists_commands() -> None:
    script = _script("rerule")
    assert script.is_file(), f"console script missing: {script}"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    usage_line = res.stdout.splitlines()[0]
    assert usage_line.startswith("usage: rerule")
    for cmd in ("prepare", "fit", "validate", "test", "demo"):
        assert cmd in usage_line
        # each command is also described on a line of its own
        assert any(line.strip().startswith(cmd + " ") for line in res.stdout.splitlines()), cmd


def test_console_script_without_command_is_a_usage_error() -> None:
    res = subprocess.run([str(_script("rerule"))], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "usage: rerule" in res.stdout


def test_prepare_help_documents_world_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (the console script is the same `main`; this avoids a second interpreter start-up).
    from rerule_lightning.cli.commands import main

    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help formatter's line wrapping
    for option in ("--world.num_forget_families", "--world.preset", "--world.hard_fraction",
                   "--model.hidden_size", "--target_training.epochs", "--cache_dir"):
        assert option in out, option
    # field docstrings of WorldConfig / SFTTrainConfig appear as the options' help
    assert "Families that lose one member to the forget set." in out
    assert "Passes over every question paraphrase of every trained fact." in out
