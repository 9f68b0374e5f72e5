"""Layer 4, tracking: the resilient MLflow logger and the config-saving callback (:mod:`.logger`), the rows and
plots of ``rerule report`` (:mod:`.report_rows`, :mod:`.plots`) and paired statistics over seeds (:mod:`.paired`).

Nothing below imports it; the command layer does."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


def __getattr__(name: str) -> Any:
    """``from rerule_lightning.tracking import ResilientMLFlowLogger`` (the module's name before the layout in
    folders) still works: names of :mod:`.logger` are forwarded lazily."""
    if name.startswith("__") or (Path(__file__).parent / f"{name}.py").exists():
        raise AttributeError(name)  # a submodule: the import system loads it
    logger = importlib.import_module("rerule_lightning.tracking.logger")
    try:
        return getattr(logger, name)
    except AttributeError:
        raise AttributeError(f"module 'rerule_lightning.tracking' has no attribute {name!r}") from None
