"""The training modules' export: where (``export_dir``), how (``export``: :class:`~rerule_lightning.primitives.
export.ExportConfig`) and with which model card, at the end of fit and, through
:class:`callbacks.ResumableCheckpoint`, at every checkpoint and on SIGTERM (so an interrupted run leaves a usable
model)."""

from __future__ import annotations

import math
from typing import Any

from rerule_lightning.primitives.export import ExportConfig, push_export, write_export
from rerule_lightning.primitives.generation import stop_ids

METHODS = {"GRPOUnlearningModule": "RULE (refusal-boundary GRPO)", "SFTModule": "rejection steering (SFT)"}


def _method(module: Any) -> str:
    name = type(module).__name__
    if name == "LossUnlearningModule":
        return f"{module.hparams.get('method', 'loss')} (loss-based unlearning)"
    trainer = getattr(module, "_trainer", None)
    replay = [type(c).__name__ for c in getattr(trainer, "callbacks", []) or [] if "Replay" in type(c).__name__]
    if name == "GRPOUnlearningModule" and replay:
        return f"ReRULE (refusal-boundary GRPO + {replay[0]})"
    return METHODS.get(name, name)


def _metrics(trainer: Any) -> dict[str, float]:
    out = {}
    for k, v in (getattr(trainer, "callback_metrics", None) or {}).items():
        if k.startswith("train/") or "/" not in k:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def export_info(module: Any, final: bool) -> dict[str, Any]:
    """Model-card facts of the module's run (:func:`rerule_lightning.primitives.export.model_card`)."""
    trainer = getattr(module, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    data = {"class": type(dm).__name__} if dm is not None else {}
    for k, v in dict(getattr(dm, "hparams", {}) or {}).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            data[k] = v
    config = {k: v for k, v in dict(module.hparams).items()}
    return {"method": _method(module), "base_model": module.policy_cfg.name_or_path, "data": data,
            "config": config, "metrics": _metrics(trainer), "final": final,
            "step": int(getattr(trainer, "global_step", 0) or 0)}


def export_settings(module: Any) -> ExportConfig:
    """The module's :class:`ExportConfig` (``export`` init argument; defaults when unset)."""
    cfg = getattr(module, "export_cfg", None)
    return cfg if isinstance(cfg, ExportConfig) else ExportConfig()


def export_module(module: Any, final: bool) -> str | None:
    """Write the module's export to ``export_dir`` (rank zero); push it when final and ``export.push_to_hub``.

    Returns:
        The export directory, or ``None`` without ``export_dir`` / off rank zero.
    """
    path = module.hparams.get("export_dir")
    trainer = getattr(module, "_trainer", None)
    if not path or module.model is None or (trainer is not None and not trainer.is_global_zero):
        return None
    settings = export_settings(module)
    merge = settings.merge if settings.merge is not None else bool(module.hparams.get("export_merged", False))
    cfg = module.policy_cfg
    eos = stop_ids(module.tokenizer, module.model, module.hparams.get("stop_token_ids"))
    info = export_info(module, final) if settings.model_card else None
    out = write_export(module.model, module.tokenizer, path, merge=merge, dtype=cfg.dtype,
                       trust_remote_code=cfg.trust_remote_code, base_model=cfg.name_or_path, eos_ids=eos, info=info)
    if final and settings.push_to_hub:
        push_export(out, settings.push_to_hub, settings.private)
    return out


__all__ = ["export_info", "export_module", "export_settings"]
