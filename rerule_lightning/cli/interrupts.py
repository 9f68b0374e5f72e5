"""Truthful endings of a ``rerule`` command stopped by SIGTERM or SIGINT.

Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit`` with status 0) at the next batch end and
SIGINT into ``sys.exit(1)``; neither says what was saved. :func:`watch_signals` records which signal arrived
(it composes with Lightning's own SIGTERM handler, which stops the loop cleanly at a batch end), and the
``rerule`` entry point then ends with the conventional status (:data:`EXIT_STATUS`: 143 for SIGTERM, 130 for
SIGINT) and one line naming the last checkpoint (:func:`ending_line`), whatever the signal interrupted (a
step, a checkpoint write, model loading). Every MLflow run of the trainer is marked ``KILLED``
(:func:`mark_killed`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: Exit status of a command stopped by a signal: 128 + the signal number, as shells report it.
EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler when no Lightning loop is running to stop at a batch end."""


_state: dict[str, Any] = {"signal": None, "trainer": None}


def received() -> str | None:
    """The name of the first signal received while :func:`watch_signals` was active (``None``: none)."""
    return _state["signal"]


def watch_trainer(trainer: Any) -> None:
    """Remember the trainer of the running command (its checkpoints and loggers are named at the end)."""
    _state["trainer"] = trainer


def _on_sigterm(signum: int, frame: Any) -> None:
    _state["signal"] = _state["signal"] or "SIGTERM"
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # Lightning's handler is not composed with ours
        raise Interrupted("SIGTERM")


def _on_sigint(signum: int, frame: Any) -> None:
    _state["signal"] = _state["signal"] or "SIGINT"
    # Python runs a handler between any two bytecodes, a GC finalizer's included, where a KeyboardInterrupt is
    # printed with its traceback and swallowed ("Exception ignored in ..."). While a fit loop runs, the trainer is
    # told to stop at the next batch end instead (as Lightning does for SIGTERM); the command then ends as stopped
    # by SIGINT. Anywhere else (loading, a checkpoint write before the loop) the KeyboardInterrupt is raised.
    trainer = _state["trainer"]
    if trainer is not None and getattr(trainer, "training", False) and not getattr(trainer, "should_stop", True):
        with contextlib.suppress(Exception):
            trainer.should_stop = True
            return
    raise KeyboardInterrupt


@contextlib.contextmanager
def watch_signals() -> Iterator[None]:
    """Record SIGTERM / SIGINT while the body runs (the previous handlers are restored afterwards)."""
    _state.update(signal=None, trainer=None)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def last_checkpoint(trainer: Any) -> str | None:
    """The newest checkpoint file the trainer's checkpoint callbacks wrote (``last.ckpt`` first), if any."""
    if trainer is None:
        return None
    found: list[str] = []
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        for attr in ("last_model_path", "_last_checkpoint_saved", "best_model_path"):
            path = getattr(cb, attr, "") or ""
            if path and os.path.isfile(path):
                found.append(path)
    return max(found, key=os.path.getmtime) if found else None


def ending_line(name: str, trainer: Any) -> str:
    """One line: which signal stopped the command, at which step, and what can be resumed."""
    step = getattr(trainer, "global_step", None) if trainer is not None else None
    at = f" at step {step}" if step is not None else ""
    ckpt = last_checkpoint(trainer)
    saved = (f"last checkpoint {ckpt} (resume with --ckpt_path {ckpt})" if ckpt else
             "no checkpoint was saved, nothing to resume from")
    return f"rerule: stopped by {name}{at}: {saved}"


def mark_killed(trainer: Any) -> None:
    """Mark every MLflow run of ``trainer`` KILLED (Lightning marked it FAILED; a failure here is ignored)."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, MLFlowLogger) and getattr(logger, "_initialized", False):
            with contextlib.suppress(Exception):
                logger.finalize("KILLED")  # passed through to MLflow by Lightning's logger too
