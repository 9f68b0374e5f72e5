"""The ``rerule`` command line.

* ``rerule prepare --config configs/embedded/prepare.yaml``: build the embedded world and models.
* ``rerule fit | validate | test --config ...``: LightningCLI over any LightningModule / DataModule
  (``class_path`` / ``init_args``), with MLflow logging by default (``sqlite:///mlflow.db``; point it at a
  server with ``--trainer.logger.init_args.tracking_uri http://host:port``).
* ``rerule attack --config configs/embedded/attack.yaml --model PATH``: robustness attacks on one model.
* ``rerule demo``: the main job on the embedded default (prepare, rejection steering, RULE, evaluation).

This module is the top of the command layer: it dispatches to :mod:`~rerule_lightning.cli.prepare`,
:mod:`~rerule_lightning.cli.lightning_cli`, :mod:`~rerule_lightning.cli.pipeline` and :mod:`~rerule_lightning.cli.report`,
and only ``rerule_lightning.__main__`` imports it (``rerule_lightning.cli:main`` is the console script;
``python -m rerule_lightning`` runs the same ``main``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Re-exported from the LightningCLI builder's own module (importing it does not import Lightning).
from rerule_lightning.cli.lightning_cli import DEFAULT_TRACKING_URI, lightning_main, quiet_libraries  # noqa: F401

USAGE = """usage: rerule {prepare,fit,validate,test,attack,demo,report} [options]

  prepare   build the embedded world, tokenizer, target and retain models (cached by config hash)
  fit       train a model from a LightningCLI config (rejection steering, RULE, ReRULE)
  validate  run validation of a model and data config
  test      evaluate a model on every evaluation split (writes eval.json)
  attack    robustness of a model: sampling (leak@k), quantization, relearning, adversarial prompts (attack.json)
  demo      the main job on the embedded default: prepare -> rejection steering -> RULE -> evaluation
  report    compare MLflow runs: table (Markdown, CSV) and plots, logged to a report run

Run `rerule COMMAND --help` for the options of one command; `rerule --version` prints the versions.

  --threads N   (prepare, fit, validate, test, attack, demo) torch intra-op threads, pinned so that a run repeats
                exactly on the same machine; default $RERULE_THREADS, else $OMP_NUM_THREADS, else 2;
                0 leaves torch's default (one thread per core)"""


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``rerule`` console script.

    ``ValueError`` and ``FileNotFoundError`` (what our config, path and input checks raise, before training,
    and jsonargparse's parse and instantiation errors, made one line naming the flag by
    :func:`rerule_lightning.cli.lightning_cli.one_line_error`) are reported as one ``rerule: error: ...`` line with
    exit status 2 instead of a traceback; set
    ``RERULE_DEBUG=1`` to see the traceback (also for such an error raised later, during training). A fit
    stopped by the non-finite guard (:class:`rerule_lightning.primitives.guards.NonFiniteError`, after training started
    and its last good state was checkpointed) is reported the same way with exit status 1. SIGTERM and SIGINT
    end the command with status 143 / 130 and one line naming the last checkpoint
    (:mod:`rerule_lightning.cli.interrupts`), the MLflow run marked ``KILLED``.
    """
    from rerule_lightning.cli.interrupts import watch_signals

    with watch_signals():
        try:
            rc = _main(argv)
        except BaseException as err:
            ended = _signal_ending(err)
            if ended is None:
                raise
            return ended
        # A signal whose KeyboardInterrupt was swallowed (raised inside a finalizer: "Exception ignored in ...")
        # stopped the loop through trainer.should_stop instead: the same ending line and status.
        ended = _signal_ending(None)
        return rc if ended is None else ended


def _signal_ending(err: BaseException | None) -> int | None:  # noqa: ARG001 - any exception, once a signal arrived
    """After SIGTERM / SIGINT, whatever it interrupted: the one line and exit status (143 / 130)."""
    from rerule_lightning.cli import interrupts

    name = interrupts.received()
    if name is None or os.environ.get("RERULE_DEBUG"):
        return None
    trainer = interrupts._state["trainer"]
    interrupts.mark_killed(trainer)
    print(interrupts.ending_line(name, trainer), file=sys.stderr, flush=True)
    return interrupts.EXIT_STATUS[name]


def _main(argv: list[str] | None) -> Any:
    try:
        return _dispatch(argv)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("RERULE_DEBUG"):
            raise
        print(f"rerule: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from rerule_lightning.primitives.guards import NonFiniteError

        if not isinstance(err, NonFiniteError) or os.environ.get("RERULE_DEBUG"):
            raise
        print(f"rerule: error: {err}", file=sys.stderr)
        return 1


def version_line() -> str:
    """``rerule-lightning X (torch ..., lightning ..., transformers ..., peft ...)``, read without importing them."""
    from importlib import metadata

    from rerule_lightning import __version__

    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{d} {v(d)}" for d in ("torch", "lightning", "transformers", "peft", "bitsandbytes"))
    return f"rerule-lightning {__version__} ({deps}; python {sys.version.split()[0]})"


def _dispatch(argv: list[str] | None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        print(version_line())
        return 0
    quiet_libraries()
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        from rerule_lightning.cli.prepare import prepare_main

        return prepare_main(rest)
    if cmd in ("fit", "validate", "test"):
        lightning_main(argv)
        return 0
    if cmd == "attack":
        from rerule_lightning.cli.attack import attack_main

        return attack_main(rest)
    if cmd == "demo":
        from rerule_lightning.cli.pipeline import demo_main

        return demo_main(rest)
    if cmd == "report":
        from rerule_lightning.cli.report import report_main

        return report_main(rest)
    print(f"rerule: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
