"""The ``rerule`` command line.

* ``rerule prepare --config configs/embedded/prepare.yaml``: build the embedded world and models.
* ``rerule fit | validate | test --config ...``: LightningCLI over any LightningModule / DataModule
  (``class_path`` / ``init_args``), with MLflow logging by default (``sqlite:///mlflow.db``; point it at a
  server with ``--trainer.logger.init_args.tracking_uri http://host:port``).
* ``rerule demo``: the main job on the embedded default (prepare, rejection steering, RULE, evaluation).
"""

from __future__ import annotations

import os
import sys
from typing import Any

USAGE = """usage: rerule {prepare,fit,validate,test,demo,report} [options]

  prepare   build the embedded world, tokenizer, target and retain models (cached by config hash)
  fit       train a model from a LightningCLI config (rejection steering, RULE, ReRULE)
  validate  run validation of a model and data config
  test      evaluate a model on every evaluation split (writes eval.json)
  demo      the main job on the embedded default: prepare -> rejection steering -> RULE -> evaluation
  report    compare MLflow runs: table (Markdown, CSV) and plots, logged to a report run

Run `rerule COMMAND --help` for the options of one command."""

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def quiet_libraries() -> None:
    """Silence per-call progress bars and tips of datasets / transformers / Lightning (not our own bars)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - optional
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers|defined a `validation_step`"
                                              r"|module\(s\) in eval mode|no `validation_step`|LightningCLI.s args parameter).*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def prepare_main(argv: list[str]) -> Any:
    """``rerule prepare``: jsonargparse over :func:`rerule_lightning.prepare.prepare`."""
    from jsonargparse import CLI

    from rerule_lightning.prepare import prepare
    from rerule_lightning.validation import check_config_files

    check_config_files(argv)
    CLI(prepare, args=argv, as_positional=False)
    return 0


def lightning_main(argv: list[str], run: bool = True) -> Any:
    """``rerule fit | validate | test``: LightningCLI with MLflow and our config-artifact callback.

    With ``run=False`` the config is parsed and every class instantiated, nothing is run (no weights are
    loaded: that happens in ``configure_model``). ``argv`` may then still start with a subcommand, whose own
    options (``ckpt_path``, ``verbose``, ...) are parsed as usual.
    """
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from rerule_lightning.tracking import MLflowSaveConfigCallback
    from rerule_lightning.validation import check_config_files, preflight, preflight_checkpoint

    check_config_files(argv)

    class ReruleCLI(LightningCLI):
        """Runs :func:`rerule_lightning.validation.preflight` (tracking server, checkpoint, inputs) first."""

        def _parse_ckpt_path(self) -> None:
            # Lightning would torch.load the file raw and merge its hyper-parameters into the config; we check
            # it (weights_only=True, errors naming the file) and keep the given config as the source of truth.
            preflight_checkpoint(self.config)

        def before_fit(self) -> None:
            preflight(self, "fit")

        def before_validate(self) -> None:
            preflight(self, "validate")

        def before_test(self) -> None:
            preflight(self, "test")

    cli_class = ReruleCLI
    if not run and argv and argv[0] in ("fit", "validate", "test", "predict"):
        # LightningCLI(run=False) accepts no subcommand; parse it as run=True would, but skip running it.
        class InstantiateOnlyCLI(ReruleCLI):
            def _run_subcommand(self, subcommand: str) -> None:
                return None

        cli_class, run = InstantiateOnlyCLI, True
    trainer_defaults = {
        "logger": {
            "class_path": "rerule_lightning.tracking.ResilientMLFlowLogger",
            "init_args": {"experiment_name": "rerule", "tracking_uri": DEFAULT_TRACKING_URI},
        },
    }
    return cli_class(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        trainer_defaults=trainer_defaults, save_config_callback=MLflowSaveConfigCallback,
        save_config_kwargs={"overwrite": True}, args=argv, run=run, auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``rerule`` console script.

    ``ValueError`` and ``FileNotFoundError`` (what our config, path and input checks raise, before training)
    are reported as one ``rerule: error: ...`` line with exit status 2 instead of a traceback; set
    ``RERULE_DEBUG=1`` to see the traceback (also for such an error raised later, during training). A fit
    stopped by the non-finite guard (:class:`rerule_lightning.guards.NonFiniteError`, after training started
    and its last good state was checkpointed) is reported the same way with exit status 1.
    """
    try:
        return _dispatch(argv)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("RERULE_DEBUG"):
            raise
        print(f"rerule: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from rerule_lightning.guards import NonFiniteError

        if not isinstance(err, NonFiniteError) or os.environ.get("RERULE_DEBUG"):
            raise
        print(f"rerule: error: {err}", file=sys.stderr)
        return 1


def _dispatch(argv: list[str] | None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    quiet_libraries()
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        return prepare_main(rest)
    if cmd in ("fit", "validate", "test"):
        lightning_main(argv)
        return 0
    if cmd == "demo":
        from rerule_lightning.pipeline import demo_main

        return demo_main(rest)
    if cmd == "report":
        from rerule_lightning.report import report_main

        return report_main(rest)
    print(f"rerule: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
