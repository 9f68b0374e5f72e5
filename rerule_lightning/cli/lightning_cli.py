"""The LightningCLI behind ``rerule fit | validate | test``, and what every ``rerule`` command shares.

* :func:`lightning_main` builds :class:`ReruleCLI`: any LightningModule / DataModule by ``class_path``, MLflow
  by default (:data:`DEFAULT_TRACKING_URI`), the resolved config logged as an artifact, and the checks of
  :mod:`rerule_lightning.cli.validation` before Lightning runs anything.
* :func:`pin_threads`: the torch thread count of a command (``--threads``, :data:`THREADS_HELP`), so that a
  run repeats exactly on the same machine.
* :func:`one_line_error` (:mod:`rerule_lightning.cli.errors`, re-exported): jsonargparse's nested error text (union subtypes, a dump of the resolved
  ``Namespace``) as one line naming the flag, e.g. ``--model.init_args.num_generations=1: GRPO needs at least
  2 completions per prompt``. The ``rerule`` entry point prints it as ``rerule: error: ...`` (exit status 2);
  ``RERULE_DEBUG=1`` shows the traceback with jsonargparse's full text.
* :func:`function_main`: jsonargparse over a plain function (``rerule prepare``, ``rerule demo``) with the same
  thread pinning and one-line errors.

Lightning is imported only when a CLI is built, so importing this module (and ``rerule --help``) stays fast.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from rerule_lightning.cli.errors import (  # noqa: F401 (re-exported)
    _SUBCOMMANDS,
    ConfigError,
    is_jsonargparse_error,
    one_line_error,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# ------------------------------------------------------------------------------------------- threads
THREADS_ENV = "RERULE_THREADS"
#: The default count: fixed rather than one per core, because how float32 reductions are split between
#: threads (hence their last bits) depends on the thread count, not on the number of cores. It is also what
#: torch chose on the 2-core machine that produced docs/RESULTS.md.
DEFAULT_THREADS = 2
THREADS_HELP = (f"torch intra-op threads (torch.set_num_threads), pinned so that a run repeats exactly on the same "
                f"machine; default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else {DEFAULT_THREADS}; 0 leaves torch's "
                f"own default (one thread per core)")


def resolve_threads(value: int | str | None) -> int:
    """The thread count a command uses: ``value``, else ``$RERULE_THREADS``, else ``$OMP_NUM_THREADS``, else
    :data:`DEFAULT_THREADS`; ``0`` means torch's own default.

    Raises:
        ValueError: Naming the flag or variable when the value is not an integer >= 0.
    """
    source = "--threads"
    if value is None:
        for env in (THREADS_ENV, "OMP_NUM_THREADS"):
            if os.environ.get(env, "").strip():
                value, source = os.environ[env], f"${env}"
                break
        else:
            return DEFAULT_THREADS
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{source}={value}: expected an integer >= 0 (0 leaves torch's default, one thread per core)")
    return n


def pin_threads(value: int | str | None = None) -> int:
    """Set torch's intra-op thread count (see :func:`resolve_threads`) for this process and the processes it
    starts (``OMP_NUM_THREADS``, which Lightning's DDP launcher then leaves alone). Returns the count (0: not
    pinned)."""
    n = resolve_threads(value)
    if n > 0:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def pop_threads(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``--threads N`` / ``--threads=N`` off ``argv``: ``(N or None, the other arguments)``."""
    value, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--threads":
            if i + 1 >= len(argv):
                raise ValueError("--threads: expected a value")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith("--threads="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def quiet_libraries() -> None:
    """Silence per-call progress bars and tips of datasets / transformers / Lightning (not our own bars, nor the
    hub's download progress)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - optional
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-call bars ("Loading weights"); it also turns off the hub's ...
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass
    try:  # ... download bars, which a user fetching an 8 B model wants to see (HF_HUB_DISABLE_PROGRESS_BARS=1 hides)
        from huggingface_hub.utils import enable_progress_bars

        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() not in ("1", "true", "yes", "on"):
            enable_progress_bars()
    except Exception:  # pragma: no cover - optional
        pass
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers|defined a `validation_step`"
                                              r"|module\(s\) in eval mode|no `validation_step`|LightningCLI.s args parameter).*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def function_main(fn: Callable[..., Any], argv: list[str], prog: str | None = None) -> Any:
    """jsonargparse's ``CLI`` over ``fn`` (``--config``, ``--print_config``, ``--help``) with one-line errors.

    ``--threads`` is pinned first (:func:`pin_threads`), unless ``fn`` takes ``threads`` itself (then it is
    an ordinary argument of ``fn``, which passes it on).

    Raises:
        ConfigError: A parse error, as one line naming the flag.
    """
    from jsonargparse import CLI, ArgumentError

    from rerule_lightning.cli.validation import check_config_files

    check_config_files(argv)  # exists, UTF-8, no key twice
    kwargs: dict[str, Any] = {}
    if "threads" not in inspect.signature(fn).parameters:
        threads, argv = pop_threads(argv)
        pin_threads(threads)
        kwargs["epilog"] = f"--threads N: {THREADS_HELP}"
    try:
        return CLI(fn, args=argv, as_positional=False, exit_on_error=False, prog=prog, **kwargs)
    except ArgumentError as err:
        raise ConfigError(one_line_error(str(err))) from err


@functools.cache
def rerule_cli_class() -> type:
    """:class:`ReruleCLI` (built on first use: it subclasses Lightning's ``LightningCLI``)."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningCLI

    from rerule_lightning.cli.validation import preflight, preflight_checkpoint

    class ReruleCLI(LightningCLI):
        """``LightningCLI`` with ``--threads``, one-line config errors and :func:`~rerule_lightning.cli.validation.
        preflight` (tracking server, inputs, checkpoint) before fit / validate / test. A
        :class:`~rerule_lightning.tracking.completions.CompletionsTable` with its defaults is added to the trainer's
        callbacks unless the config lists one (list one to configure it; ``every_n_steps: 0`` and
        ``num_eval_items: 0`` turn it off)."""

        #: ``(path, parameter names -> shapes)`` of a ``--ckpt_path`` file, checked while parsing.
        checkpoint: tuple[str, Mapping[str, Any]] | None = None
        #: Whether the paths are checked (:func:`~rerule_lightning.cli.paths.check_paths`) before instantiation.
        check_paths_first: bool = True

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--threads", type=int | None, default=None, help=THREADS_HELP)

        def parse_arguments(self, parser: Any, args: Any) -> None:
            for p in (parser, *getattr(self, "_subcommand_parsers", {}).values()):
                p.exit_on_error = False  # raise, so that the entry point prints one line
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                raise ConfigError(one_line_error(str(err))) from err

        def _parse_ckpt_path(self) -> None:
            # Lightning would torch.load the file raw and merge its hyper-parameters into the config; we check
            # it (weights_only=True, errors naming the file) and keep the given config as the source of truth.
            self.checkpoint = preflight_checkpoint(self.config)

        def _subcommand_config(self) -> Any:
            return self.config[self.subcommand] if self.subcommand else self.config

        def before_instantiate_classes(self) -> None:
            from rerule_lightning.cli.knobs import knob_errors, overlay_errors
            from rerule_lightning.cli.paths import check_paths

            cfg = self._subcommand_config()
            cfg.threads = pin_threads(cfg.get("threads"))  # the logged config says what was used
            errors = knob_errors(cfg) + overlay_errors(cfg)  # YAML and flags alike, before any class is built
            if errors:
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise ConfigError(errors[0] + more if len(errors) > 3 else "; ".join(errors))
            if self.subcommand and self.check_paths_first:  # before building an MLflow logger opens its database
                check_paths(cfg, self.subcommand)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except ValueError as err:
                if isinstance(err, ConfigError) or not is_jsonargparse_error(str(err)):
                    raise
                raise ConfigError(one_line_error(str(err), self._subcommand_config())) from err
            from rerule_lightning.cli.interrupts import watch_trainer
            from rerule_lightning.tracking.completions import CompletionsTable

            if not any(isinstance(c, CompletionsTable) for c in self.trainer.callbacks):  # on by default
                self.trainer.callbacks.append(CompletionsTable())
            watch_trainer(self.trainer)  # a signal's ending line names its checkpoints

        def before_fit(self) -> None:
            preflight(self, "fit")

        def before_validate(self) -> None:
            preflight(self, "validate")

        def before_test(self) -> None:
            preflight(self, "test")

    return ReruleCLI


def __getattr__(name: str) -> Any:
    if name == "ReruleCLI":  # without importing Lightning with this module
        return rerule_cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lightning_main(argv: list[str], run: bool = True) -> Any:
    """``rerule fit | validate | test``: LightningCLI with MLflow and our config-artifact callback.

    With ``run=False`` the config is parsed and every class instantiated, nothing is run (no weights are
    loaded: that happens in ``configure_model``). ``argv`` may then still start with a subcommand, whose own
    options (``ckpt_path``, ``verbose``, ...) are parsed as usual. ``--threads`` pins this process's torch
    thread count (:func:`pin_threads`) before any class is instantiated.

    Raises:
        ConfigError: A config or flag error (parsing or a component's own validation), as one line.
    """
    import lightning as L

    from rerule_lightning.cli.validation import check_config_files
    from rerule_lightning.tracking.logger import MLflowSaveConfigCallback

    check_config_files(argv)
    cli_class = rerule_cli_class()
    if not run and argv and argv[0] in _SUBCOMMANDS:
        # LightningCLI(run=False) accepts no subcommand; parse it as run=True would, but skip running it.
        class InstantiateOnlyCLI(cli_class):  # type: ignore[misc, valid-type]
            check_paths_first = False  # nothing is read or written

            def _run_subcommand(self, subcommand: str) -> None:
                return None

        cli_class, run = InstantiateOnlyCLI, True
    trainer_defaults = {
        "logger": {
            "class_path": "rerule_lightning.tracking.logger.ResilientMLFlowLogger",
            "init_args": {"experiment_name": "rerule", "tracking_uri": DEFAULT_TRACKING_URI},
        },
    }
    return cli_class(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        trainer_defaults=trainer_defaults, save_config_callback=MLflowSaveConfigCallback,
        save_config_kwargs={"overwrite": True}, args=argv, run=run, auto_configure_optimizers=False,
    )
