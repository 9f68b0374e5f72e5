"""``python -m rerule_lightning`` is ``rerule``; ``rerule --version``; quieting the libraries keeps the hub's
download progress bars (a user fetching a model sees it) while transformers' per-call bars stay off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "rerule_lightning", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_python_dash_m_is_the_rerule_command() -> None:
    from rerule_lightning import __version__

    out = run_module("--version")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"rerule-lightning {__version__} (torch ") and "transformers " in line, line
    bad = run_module("nope")
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr and "usage: rerule" in bad.stderr


def test_version_matches_the_distribution() -> None:
    import tomllib

    from rerule_lightning import __version__
    from rerule_lightning.cli.commands import main

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
    assert main(["--version"]) == 0


def test_quiet_libraries_keeps_hub_download_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    from rerule_lightning.cli.lightning_cli import quiet_libraries

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    disable_progress_bars()
    quiet_libraries()
    assert not are_progress_bars_disabled(), "hub download progress hidden"
    assert not hf_logging.is_progress_bar_enabled(), "transformers' per-call bars shown"
