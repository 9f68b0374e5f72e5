"""Checkpoints that are written atomically and loaded safely.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target directory, flushes and
  ``fsync``\\ s it, then ``os.replace``\\ s it over the target and ``fsync``\\ s the directory. A kill during the
  write leaves the previous file (``last.ckpt`` included) untouched and only a ``.tmp-*`` file behind,
  which the next write in that directory removes.
* Loading always uses ``torch.load(weights_only=True)``: a checkpoint that carries pickled Python objects
  (classes, functions, a ``__reduce__`` payload) is refused before anything in it runs. A missing,
  truncated or non-checkpoint file fails with a ``ValueError`` / ``FileNotFoundError`` naming the file.
* :func:`check_state_dict_matches` refuses a checkpoint from a different model (other parameter names or
  shapes), naming the file and the first differences.
* :class:`TrainableStateMixin` keeps frozen weights out of a module's ``state_dict`` (so out of every
  checkpoint): the frozen KL reference under full fine-tuning, the frozen (quantised) base under (Q)LoRA. They are
  rebuilt from their source by ``configure_model`` on resume, exactly as they were, so resuming stays exact.
"""

from __future__ import annotations

import glob
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_MARK = ".tmp-"
REQUIRED_KEYS = ("state_dict", "pytorch-lightning_version")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the complete new one.

    Args:
        obj: What to save (tensors and plain types).
        path: Destination file; its directory is created if needed.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}*")):
        try:  # left by a writer that was killed mid-write
            os.remove(stale)
        except OSError:
            pass
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def safe_load(path: str, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is truncated, not a torch checkpoint, or carries pickled Python objects.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes): the write was interrupted; use an earlier one")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one lacks its directory
        raise ValueError(f"checkpoint {path!r} is truncated or not a torch checkpoint (no complete zip archive "
                         f"in {os.path.getsize(path)} bytes): the write was interrupted, or it is another file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {path!r} refused: it holds pickled Python objects beyond tensors and plain types, "
            f"and is loaded only with torch.load(weights_only=True) ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path!r} is truncated or not a torch checkpoint "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def validate_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load ``path`` safely and check it is a Lightning checkpoint.

    Returns:
        The loaded checkpoint.

    Raises:
        FileNotFoundError, ValueError: See :func:`safe_load`; also when a required key is missing.
    """
    ckpt = safe_load(path, map_location=map_location)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path!r} is not a Lightning checkpoint (a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path!r} is not a Lightning checkpoint: missing key(s) {missing}")
    return dict(ckpt)


def state_dict_differences(saved: Mapping[str, Any], expected: Mapping[str, Any], limit: int = 3) -> list[str]:
    """Human-readable differences of parameter names and shapes between two state dicts (at most ``limit``)."""
    out: list[str] = []
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing:
        out.append(f"missing {missing[:limit]}{' ...' if len(missing) > limit else ''} ({len(missing)} in all)")
    if unexpected:
        out.append(f"unexpected {unexpected[:limit]}{' ...' if len(unexpected) > limit else ''} "
                   f"({len(unexpected)} in all)")
    shapes = [f"{k}: {tuple(saved[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
              for k in expected if k in saved and torch.is_tensor(saved[k]) and torch.is_tensor(expected[k])
              and saved[k].shape != expected[k].shape]
    out += shapes[:limit]
    return out


def check_state_dict_matches(saved: Mapping[str, Any], expected: Mapping[str, Any], path: str | None) -> None:
    """Refuse a checkpoint whose parameters do not belong to this model.

    Raises:
        ValueError: Naming ``path`` and the first differing parameter names / shapes.
    """
    diffs = state_dict_differences(saved, expected)
    if diffs:
        raise ValueError(f"checkpoint {str(path)!r} is from a different model than the configured one: "
                         + "; ".join(diffs))


def frozen_state_keys(module: torch.nn.Module, keys: Iterable[str]) -> set[str]:
    """The ``keys`` of ``module``'s state that belong to frozen weights.

    A key is frozen when it lies in a submodule whose parameters all have ``requires_grad=False`` (the whole
    reference model; a quantised base layer with its quantisation state), or it is, or extends (``weight.absmax``),
    a direct parameter / buffer of a module whose own direct parameters are all frozen (a base linear, embedding or
    norm beside LoRA adapters). Buffers of a module with trainable parameters are kept.

    Args:
        module: The module whose ``state_dict`` the keys come from.
        keys: State-dict keys (without a prefix).

    Returns:
        The frozen ones.
    """
    whole: list[str] = []
    direct: dict[str, set[str]] = {}
    for name, m in module.named_modules():
        if not name:
            continue
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            whole.append(name + ".")
            continue
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            direct[name + "."] = {n for n, _ in m.named_parameters(recurse=False)} | \
                {n for n, _ in m.named_buffers(recurse=False)}
    frozen = set()
    for k in keys:
        if any(k.startswith(w) for w in whole):
            frozen.add(k)
            continue
        head, _, tail = k.rpartition(".")
        while head:  # the module prefix of k whose direct names hold its first component
            names = direct.get(head + ".")
            if names is not None and k[len(head) + 1:].split(".")[0] in names:
                frozen.add(k)
                break
            head, _, _ = head.rpartition(".")
    return frozen


class TrainableStateMixin:
    """``state_dict`` / ``load_state_dict`` of a LightningModule without its frozen weights.

    Checkpoints then hold the trainable parameters (full fine-tuning: the policy; (Q)LoRA: the adapters), their
    buffers and the optimizer state of those parameters (which Lightning stores separately); the frozen modules
    are rebuilt by ``configure_model`` from the same source on resume. Loading a checkpoint that still carries
    frozen keys (an older, full one) ignores them.
    """

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        prefix = kwargs.get("prefix", "")
        frozen = frozen_state_keys(self, [k[len(prefix):] for k in state])  # type: ignore[arg-type]
        for k in frozen:
            del state[prefix + k]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        frozen = frozen_state_keys(self, state_dict.keys())  # type: ignore[arg-type]
        lean = {k: v for k, v in state_dict.items() if k not in frozen}
        result = super().load_state_dict(lean, strict=False, assign=assign)  # type: ignore[misc]
        expected = set(self.state_dict())
        missing = sorted(expected - set(lean))
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                               f"{missing[:5]}, unexpected keys {list(result.unexpected_keys)[:5]}")
        return result._replace(missing_keys=missing)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic writes (temp file, fsync, rename) and ``weights_only=True`` reads.

    The CLI installs it by default (``trainer.plugins``), so every ``ModelCheckpoint`` file, ``last.ckpt``
    included, is either the complete previous version or the complete new one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not support storage_options")
        atomic_torch_save(checkpoint, os.fspath(path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"checkpoint {os.fspath(path)!r}: loading with weights_only=False is disabled")
        return validate_checkpoint(os.fspath(path), map_location=map_location)
