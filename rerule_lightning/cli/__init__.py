"""Layer 5, the command line: ``rerule`` (:mod:`.commands`), the LightningCLI builder (:mod:`.lightning_cli`),
the preflight checks that run before any work (:mod:`.validation`, :mod:`.knobs`, :mod:`.paths`), one-line
config errors (:mod:`.errors`), signal endings (:mod:`.interrupts`) and the commands that assemble whole jobs
(:mod:`.prepare`, :mod:`.pipeline`, :mod:`.report`): the only part of the core that imports ``datamodules`` and
``callbacks``.

``from rerule_lightning.cli import main`` (the name before the layout in folders) still works: names of
:mod:`.commands` are forwarded lazily, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or (Path(__file__).parent / f"{name}.py").exists():
        raise AttributeError(name)  # a submodule: the import system loads it
    commands = importlib.import_module("rerule_lightning.cli.commands")
    try:
        return getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module 'rerule_lightning.cli' has no attribute {name!r}") from None
