"""Preflight of every path a ``rerule fit | validate | test`` run reads or writes, before any run is created.

* Inputs: the embedded ``world_dir`` exists (its files are checked when it is loaded, before training).
* Model directories (``policy.name_or_path``, ``reference_path``, ``eval_reference``): ``config.json``
  readable, weights present with readable headers (a safetensors file's header and its declared size, so a
  truncated download fails here, not as a 50-line ``SafetensorError`` after the MLflow run exists), the tokenizer
  loadable and no larger than the model's vocabulary (else an ``IndexError`` in the middle of a step).
  Hub ids (not local-looking paths) are left to ``from_pretrained``.
* Outputs (``export_dir``, ``eval_report_path``, ``trainer.default_root_dir``, a ``ModelCheckpoint`` dirpath):
  of the right kind (a directory is not an existing file and vice versa) and creatable (the nearest existing
  ancestor is a directory a file can be created in; probed, not guessed from permission bits).
* The MLflow tracking URI: a ``sqlite:///`` database's directory exists and is writable (no directories are
  created outside the project, and no minutes of retries before the error).

Every problem raises ``ValueError`` / ``FileNotFoundError`` naming the flag and the path; the CLI prints it as
one ``rerule: error: ...`` line (exit status 2).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Any

from rerule_lightning.cli.knobs import mro_names
from rerule_lightning.primitives.policy import looks_local, missing_path_hint

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def safetensors_problem(path: str) -> str | None:
    """Why ``path`` is not a complete safetensors file (header length, JSON header, size), ``None`` if it is."""
    size = os.path.getsize(path)
    if size < 8:
        return f"{path} is truncated ({size} bytes)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"{path} is truncated (its header alone declares {n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path} has an unreadable header (not a safetensors file)"
    ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path} is truncated ({size} of {need} bytes)"
    return None


def _weights(path: str) -> list[str]:
    for index in INDEX_FILES:
        p = os.path.join(path, index)
        if os.path.isfile(p):
            try:
                shards = sorted(set(json.load(open(p, encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError):
                raise ValueError(f"{p} is not a valid weight index") from None
            return [os.path.join(path, s) for s in shards]
    return [os.path.join(path, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))] or \
        [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]


def check_model_dir(path: Any, flag: str, weights: bool = True) -> dict[str, Any] | None:
    """A local model directory: ``config.json`` (or an adapter's ``adapter_config.json``) and its weights.

    Args:
        path: The directory (a hub id or ``None`` is skipped).
        flag: The flag that sets it (named in the messages).
        weights: Whether weights must be there (``False``: a tokenizer-only directory).

    Returns:
        The parsed ``config.json`` (``None`` for a skipped path or an adapter directory).

    Raises:
        FileNotFoundError, ValueError: Naming the flag, the path and what is missing or broken.
    """
    if not isinstance(path, str) or not looks_local(path):
        return None
    p = os.path.expanduser(path)
    if not os.path.isdir(p):
        if os.path.isfile(p):
            raise FileNotFoundError(f"{flag}={path!r}: is a file, expected a model directory")
        raise FileNotFoundError(f"{flag}={path!r}: directory not found. {missing_path_hint(path)}")
    if not weights:
        return None
    adapter = os.path.isfile(os.path.join(p, "adapter_config.json"))
    cfg_path = os.path.join(p, "config.json")
    config = None
    if not adapter:
        if not os.path.isfile(cfg_path):
            found = sorted(os.listdir(p))[:5]
            raise FileNotFoundError(f"{flag}={path!r}: no config.json, not a model directory "
                                    f"({'empty' if not found else 'has ' + ', '.join(found)})")
        try:
            config = json.loads(open(cfg_path, "rb").read().decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{flag}={path!r}: {cfg_path} is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag}={path!r}: {cfg_path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                             f"{e.msg})") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError(f"{flag}={path!r}: {cfg_path} has no 'model_type', not a transformers model config")
    files = _weights(p)
    if not files:
        raise FileNotFoundError(f"{flag}={path!r}: no weights (expected one of {', '.join(WEIGHT_FILES[:2])} or "
                                "a sharded index)")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{flag}={path!r}: weight shard {f} is missing")
        problem = safetensors_problem(f) if f.endswith(".safetensors") else \
            (f"{f} is empty" if os.path.getsize(f) == 0 else None)
        if problem:
            raise ValueError(f"{flag}={path!r}: {problem}")
    return config


def check_tokenizer(policy: Any, flag: str, config: dict[str, Any] | None) -> None:
    """The policy's tokenizer loads, and has no more tokens than the model's vocabulary (``config``)."""
    from rerule_lightning.primitives.policy import load_tokenizer

    path = policy.tokenizer or policy.name_or_path
    tok_flag = f"{flag.rsplit('.', 1)[0]}.tokenizer" if policy.tokenizer else flag
    if not isinstance(path, str) or not looks_local(path):
        return
    try:
        tok = load_tokenizer(policy)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{tok_flag}={path!r}: the tokenizer could not be loaded ({first[:200]})") from None
    vocab = (config or {}).get("vocab_size")
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ValueError(f"{tok_flag}={path!r}: the tokenizer has {len(tok)} tokens but the model's vocabulary "
                         f"({flag}) has {vocab}; use the model's own tokenizer")


def output_problem(path: str, kind: str) -> str | None:
    """Why ``path`` cannot be written as a ``kind`` (``"dir"`` or ``"file"``); ``None`` when it can."""
    p = os.path.abspath(os.path.expanduser(path))
    if kind == "dir" and os.path.isfile(p):
        return "is an existing file, expected a directory"
    if kind == "file" and os.path.isdir(p):
        return "is a directory, expected a file path"
    base = p if kind == "dir" else os.path.dirname(p)
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        return f"cannot be created: {base} is a file"
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".rerule-probe-"):
            pass
    except OSError as err:
        return f"cannot be created: {base} is not writable ({err.strerror or err})"
    return None


def check_output(path: Any, kind: str, flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` when ``path`` (if set) cannot be written as a ``kind``."""
    if isinstance(path, (str, os.PathLike)) and str(path).strip():
        problem = output_problem(os.fspath(path), kind)
        if problem:
            raise ValueError(f"{flag}={os.fspath(path)!r}: {problem}")


def check_tracking_uri(uri: Any, flag: str = "--trainer.logger.init_args.tracking_uri") -> None:
    """A ``sqlite:///`` store's database can be created or opened: its directory exists and is writable."""
    if not isinstance(uri, str) or not uri.startswith("sqlite:///"):
        return
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return
    folder = os.path.dirname(os.path.abspath(db)) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag}={uri}: the database's directory {folder} does not exist (create it, or "
                                "choose another database)")
    if os.path.isdir(db):
        raise ValueError(f"{flag}={uri}: {db} is a directory, expected a database file")
    if os.path.isfile(db) and not os.access(db, os.R_OK | os.W_OK):
        raise ValueError(f"{flag}={uri}: the database {db} is not readable and writable")
    problem = output_problem(db, "file")
    if problem:
        raise ValueError(f"{flag}={uri}: the database {problem}")


def _get(node: Any, key: str) -> Any:
    node = node.as_dict() if hasattr(node, "as_dict") else node
    return node.get(key) if isinstance(node, dict) else None


def check_logger_config(trainer: Any) -> None:
    """The tracking URI of every MLflow logger in a parsed ``trainer`` config, before the loggers are built
    (``MLFlowLogger.__init__`` already opens, and creates, a sqlite database with its directories)."""
    node = _get(trainer, "logger")
    for logger in node if isinstance(node, (list, tuple)) else [node]:
        args = _get(logger, "init_args")
        if isinstance(args, dict) and "MLFlowLogger" in mro_names(_get(logger, "class_path") or ""):
            check_tracking_uri(args.get("tracking_uri"))


def check_paths(config: Any, subcommand: str) -> None:
    """Every path of a parsed ``rerule fit | validate | test`` config (YAML and flags merged), before any class
    is built (so before any MLflow database or run exists); see the module docstring. The first problem raises.

    Args:
        config: The subcommand's config (``model``, ``data``, ``trainer``).
        subcommand: ``fit`` checks ``export_dir``, ``test`` checks ``eval_report_path``.
    """
    from rerule_lightning.primitives.policy import PolicyConfig

    trainer = _get(config, "trainer") or {}
    check_logger_config(trainer)
    check_output(_get(trainer, "default_root_dir"), "dir", "--trainer.default_root_dir")
    callbacks = _get(trainer, "callbacks") or []
    for cb in callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]:
        if "ModelCheckpoint" in mro_names(_get(cb, "class_path") or ""):
            check_output(_get(_get(cb, "init_args"), "dirpath"), "dir",
                         "--trainer.callbacks.init_args.dirpath (ModelCheckpoint)")
    data = _get(_get(config, "data"), "init_args") or {}
    world = data.get("world_dir")
    if isinstance(world, str) and not os.path.isdir(os.path.expanduser(world)):
        raise FileNotFoundError(f"--data.init_args.world_dir={world!r}: world directory not found. For the "
                                "embedded world run `rerule prepare --config configs/embedded/prepare.yaml` first.")
    args = _get(_get(config, "model"), "init_args") or {}
    if subcommand == "fit":
        check_output(args.get("export_dir"), "dir", "--model.init_args.export_dir")
    if subcommand == "test":
        check_output(args.get("eval_report_path"), "file", "--model.init_args.eval_report_path")
    if "policy" in args:
        given = _get(args, "policy") or {}
        known = {k: v for k, v in given.items() if k in PolicyConfig.__dataclass_fields__}
        try:
            policy = PolicyConfig(**known)
        except (TypeError, ValueError):  # the module's own check reports it
            policy = None
        if policy is not None:
            flag = "--model.init_args.policy.name_or_path"
            fresh = args.get("init") is not None  # SFTModule(init=...): only the tokenizer is read
            model_config = check_model_dir(policy.name_or_path, flag, weights=not fresh)
            check_tokenizer(policy, flag, model_config)
    for key in ("reference_path", "eval_reference"):
        check_model_dir(args.get(key), f"--model.init_args.{key}")
