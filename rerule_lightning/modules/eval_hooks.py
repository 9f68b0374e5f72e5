"""The retain model's reference statistics (cached), report identifiers and the Lightning glue of evaluation.

The glue functions take the LightningModule, so :class:`rerule_lightning.modules.grpo.GRPOUnlearningModule`
and :class:`rerule_lightning.modules.eval.EvalModule` share one implementation. They expect the module to
have ``hparams.eval_reference``, ``hparams.eval_report_path``, ``hparams.eval_max_new_tokens``,
``policy_cfg``, ``model``, ``tokenizer`` and an ``evaluator`` attribute (``None`` until ``setup``), and the
datamodule to have ``eval_splits`` and ``eval_suite`` (:class:`rerule_lightning.evaluation.suite.EvalSuite`) and, when
a retain reference is asked for, ``reference_items(splits)`` returning :class:`ReferenceItems`; optionally
``eval_vocabulary()``, the words of the degenerate-output rule (the embedded world). This module never
imports a datamodule: each datamodule says which items its reference is computed on.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rerule_lightning.evaluation.evaluator import UnlearningEvaluator, write_json_atomic
from rerule_lightning.evaluation.suite import EvalSuite

_SIGNATURE_FILES = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json")
_SIGNATURE_SUFFIXES = (".safetensors", ".bin", ".pt", ".model", ".index.json")


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:n]


def dir_signature(path: str) -> dict[str, Any]:
    """Resolved path and (name, size, mtime_ns) of the config, weight and tokenizer files directly in
    ``path`` (just the name for something that is not a local directory, e.g. a hub id)."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        return {"path": path}
    files = []
    for name in sorted(os.listdir(real)):
        full = os.path.join(real, name)
        if (name in _SIGNATURE_FILES or name.endswith(_SIGNATURE_SUFFIXES)) and os.path.isfile(full):
            st = os.stat(full)
            files.append([name, st.st_size, st.st_mtime_ns])
    return {"path": real, "files": files}


def evaluate_items(evaluator: UnlearningEvaluator, model: Any, tokenizer: Any,
                   items: Mapping[str, Sequence[Mapping[str, Any]]], batch_size: int = 64) -> None:
    """Update ``evaluator`` with every item of each of its splits found in ``items``, ``batch_size`` at a
    time (the chunks a ``ForgetRetainDataModule`` eval dataloader of that batch size serves)."""
    for split in evaluator.splits:
        rows = list(items.get(split, ()))
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            evaluator.update(split, {k: [r[k] for r in chunk] for k in chunk[0]}, model, tokenizer)


def default_reference_cache(retain_model_dir: str) -> str:
    """``eval_reference.json`` next to the (resolved) retain model directory, else under ``.cache/rerule``."""
    real = os.path.realpath(retain_model_dir)
    folder = os.path.dirname(real) if os.path.isdir(real) else os.path.join(".cache", "rerule")
    return os.path.join(folder, "eval_reference.json")


@dataclasses.dataclass
class ReferenceItems:
    """What the retain reference is computed on; a datamodule builds it (``datamodule.reference_items(splits)``),
    so the evaluation core never constructs a benchmark's loader.

    Attributes:
        suite: The suite whose forget-quality split and MIA pair are scored (teacher-forced only).
        items: Split name -> evaluation rows (``id``, ``prompt`` or ``question``, answers, options).
        signature: JSON-able identity of the items (part of the cache key).
        rendered: Whether ``prompt`` is already rendered (benchmarks) or is rendered by the evaluator (embedded).
        data_id: Identifiers written into the cache entry (world directory, data signature, source).
    """

    suite: EvalSuite
    items: Mapping[str, Sequence[Mapping[str, Any]]]
    signature: Any
    rendered: bool = False
    data_id: dict[str, Any] = dataclasses.field(default_factory=dict)


def compute_reference(retain_model_dir: str, source: ReferenceItems, cache_path: str | None = None, *,
                      batch_size: int = 64, k: float = 0.4, include_eos: bool = False,
                      use_chat_template: bool = False, dtype: str = "float32",
                      device: torch.device | str | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    """The retain model's per-item forget truth ratios and forget-vs-holdout Min-K% AUC, computed once.

    ``source`` comes from the datamodule (:class:`ReferenceItems`; the embedded
    :class:`datamodules.forget_retain.ForgetRetainDataModule` evaluates the same subsample as the evaluated
    splits, a benchmark datamodule its own items of its suite's forget-quality and MIA splits). The items are
    scored by the evaluator's own teacher-forced code path in the same batches, and cached in the JSON file
    ``cache_path`` (default :func:`default_reference_cache`) under a hash of the retain model's files (name,
    size, mtime), ``source.signature`` and these settings; the file is rewritten atomically.

    ``tokenizer`` (the policy's ``policy.tokenizer``) scores the reference with the same tokenizer as the
    evaluated model (MUSE scores every model with ``meta-llama/Llama-2-7b-hf``'s); ``None`` takes the reference
    directory's own.

    Returns:
        ``{"forget_truth_ratios": [...], "forget_ids": [...], "mia_auc": float | None, "key": str, ...}``.
    """
    from rerule_lightning.primitives.policy import PolicyConfig, load_base_model, load_tokenizer

    settings: dict[str, Any] = {"batch_size": batch_size, "k": k, "include_eos": include_eos,
                                "use_chat_template": use_chat_template, "dtype": dtype}
    if tokenizer is not None:  # (absent from the key when unset: existing caches stay valid)
        settings["tokenizer"] = tokenizer
    full = source.suite
    names = list(dict.fromkeys(s for s in [full.forget_quality_split, *(full.mia or ())] if s))
    suite = EvalSuite(full.name, [dataclasses.replace(full.spec(n), generate=False) for n in names],
                      forget_quality_split=full.forget_quality_split, mia=full.mia)
    key = _hash([dir_signature(retain_model_dir), source.signature, settings])
    data_id = dict(source.data_id)
    path = cache_path or default_reference_cache(retain_model_dir)
    cache = _read_json(path)
    if key in cache:
        return cache[key]
    cfg = PolicyConfig(name_or_path=retain_model_dir, tokenizer=tokenizer, dtype=dtype,
                       use_chat_template=use_chat_template)
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(retain_model_dir, cfg).eval().requires_grad_(False)
    model.to(device if device is not None else "cpu")
    ev = UnlearningEvaluator(suite, max_new_tokens=0, k=k, batch_size=batch_size, include_eos=include_eos,
                             use_chat_template=use_chat_template,
                             render_prompts=False if source.rendered else use_chat_template)
    evaluate_items(ev, model, tokenizer, {n: source.items[n] for n in names}, batch_size)
    values = ev.compute()
    del model
    fq, member = suite.forget_quality_split, (suite.mia or (None,))[0]
    auc = values.get(f"{member}/mia_auc", math.nan)
    ref = {"forget_truth_ratios": ev.metrics[fq]["truth_ratio"].per_item().tolist() if fq else [],
           "forget_ids": [r["id"] for r in ev.per_item() if r["split"] == fq and math.isfinite(r["truth_ratio"])],
           "mia_auc": auc if math.isfinite(auc) else None, "key": key,
           "retain_model": os.path.realpath(retain_model_dir), **data_id, "settings": settings}
    cache = _read_json(path)  # re-read: another process may have added entries meanwhile
    cache[key] = ref
    write_json_atomic(path, cache)
    return ref


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------ Lightning glue
def _datamodule(module: Any) -> Any:
    dm = getattr(module.trainer, "datamodule", None)
    if dm is None or getattr(dm, "eval_splits", None) is None:
        raise RuntimeError(f"{type(module).__name__} evaluates with a datamodule that has `eval_splits` "
                           "(e.g. datamodules.forget_retain.ForgetRetainDataModule)")
    return dm


def setup_evaluator(module: Any) -> None:
    """Create ``module.evaluator`` for the datamodule's ``eval_splits`` (once; skipped without such a
    datamodule, so training-only setups keep working)."""
    if getattr(module, "evaluator", None) is not None:
        return
    dm = getattr(module.trainer, "datamodule", None)
    splits = getattr(dm, "eval_splits", None)
    if splits is None:
        return
    renders = "prompt_format" in dm.hparams  # benchmark datamodules render prompts themselves
    # the degenerate-output rule's vocabulary (the embedded world's words); a datamodule without one: None
    vocabulary = dm.eval_vocabulary() if callable(getattr(dm, "eval_vocabulary", None)) else None
    module.evaluator = UnlearningEvaluator(
        getattr(dm, "eval_suite", None) or splits, max_new_tokens=module.hparams.eval_max_new_tokens,
        batch_size=int(dm.hparams.get("eval_batch_size", 64)), use_chat_template=module.policy_cfg.use_chat_template,
        render_prompts=False if renders else None, vocabulary=vocabulary)


def prepare_reference(module: Any) -> None:
    """Compute (or load from cache) the retain reference when ``eval_reference`` is set and none is held."""
    ev, path = getattr(module, "evaluator", None), module.hparams.eval_reference
    if ev is None or not path or ev.retain_reference is not None:
        return
    dm = _datamodule(module)
    if not hasattr(dm, "reference_items"):
        raise RuntimeError(f"model.eval_reference is set but {type(dm).__name__} has no reference_items(splits): "
                           "it cannot provide the items the retain reference is computed on")
    ev.set_reference(compute_reference(
        path, dm.reference_items(ev.splits), batch_size=ev.batch_size, k=ev.k, include_eos=ev.include_eos,
        use_chat_template=ev.use_chat_template, dtype=module.policy_cfg.dtype, device=module.device,
        tokenizer=module.policy_cfg.tokenizer))


def evaluation_step(module: Any, batch: Mapping[str, list[Any]], dataloader_idx: int = 0) -> None:
    """Update the evaluator with one batch of split ``eval_splits[dataloader_idx]``."""
    ev = getattr(module, "evaluator", None)
    if ev is None:
        _datamodule(module)  # raises the explanatory error
        raise RuntimeError("the evaluator was not created: call setup_evaluator(module) in setup()")
    split = ev.splits[dataloader_idx]
    if "split" in batch and batch["split"] and batch["split"][0] != split:
        raise RuntimeError(f"dataloader {dataloader_idx} serves split {batch['split'][0]!r}, expected {split!r}")
    ev.update(split, batch, module.model, module.tokenizer)


def evaluation_epoch_end(module: Any, write_report: bool) -> dict[str, float]:
    """Log every metric (finite values; the metrics already synced), write the report on rank zero when
    ``write_report`` and ``eval_report_path`` are set, then reset the evaluator."""
    ev = getattr(module, "evaluator", None)
    if ev is None:
        return {}
    values = ev.compute()
    module.log_dict({k: v for k, v in values.items() if math.isfinite(v)}, sync_dist=False)
    path = module.hparams.eval_report_path
    if write_report and path:
        records = ev.gather_per_item()
        if module.trainer.is_global_zero:
            ev.write_report(path, extra=report_identifiers(module), records=records)
            _log_artifact(module, path)
    if write_report and module.trainer.is_global_zero:
        print_summary(values, ev.splits, path or None)
    ev.reset()
    return values


_SHORT = {"refusal_rate": "refusal", "answer_accuracy": "acc", "rouge_l_recall": "rougeL_r",
          "rouge_l_f1": "rougeL_f1", "fluency": "fluency", "probability": "prob", "truth_ratio": "TR",
          "extraction_strength": "ES", "min_k": "min_k"}


def print_summary(values: Mapping[str, float], splits: Sequence[str], report_path: str | None = None) -> None:
    """Print one compact table (splits × metrics) and the cross-split metrics to stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Unlearning evaluation", title_justify="left")
    table.add_column("split")
    for short in _SHORT.values():
        table.add_column(short, justify="right")
    for s in splits:
        table.add_row(s, *[f"{values.get(f'{s}/{name}', math.nan):.3f}" for name in _SHORT])
    console = Console(stderr=True, width=max(Console(stderr=True).width, 128))
    console.print(table)
    cross = {k: v for k, v in values.items() if k.split("/", 1)[1] in ("forget_quality", "mia_auc", "privleak",
                                                                       "model_utility")}
    console.print("  ".join(f"{k} = {v:.4g}" for k, v in cross.items()))
    if report_path:
        console.print(f"report: {report_path}")


def report_identifiers(module: Any) -> dict[str, Any]:
    """Model and data identifiers, the resolved configuration and its hash, for ``eval.json``."""
    dm = getattr(module.trainer, "datamodule", None)
    data_h = dict(getattr(dm, "hparams", {}) or {})
    world_dir = data_h.get("world_dir")
    world_cfg_path = os.path.join(world_dir, "world_config.json") if world_dir else None
    config = {"module": f"{type(module).__module__}.{type(module).__qualname__}",
              "model": _jsonable(dict(module.hparams)),
              "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}" if dm is not None else None,
              "data": _jsonable(data_h)}
    name = module.policy_cfg.name_or_path
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name_or_path": name, **dir_signature(name), "signature_hash": _hash(dir_signature(name))},
        "data": {"world_dir": world_dir, "resolved_path": os.path.realpath(world_dir) if world_dir else None,
                 "world_config": _read_json(world_cfg_path) if world_cfg_path else None,
                 **({"source": dm.source, "data_signature": dm.data_signature()}
                    if hasattr(dm, "data_signature") else {})},
        "config": config,
        "config_hash": _hash(config),
    }


def _log_artifact(module: Any, path: str) -> None:
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in module.trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, path)


__all__ = ["ReferenceItems", "compute_reference", "default_reference_cache", "dir_signature", "evaluate_items",
           "evaluation_epoch_end", "evaluation_step", "prepare_reference", "print_summary", "report_identifiers",
           "setup_evaluator"]


class EvaluationHooks:
    """Validation / test hooks that run an :class:`UnlearningEvaluator`; mix into a LightningModule.

    The module provides ``model``, ``tokenizer`` and ``hparams`` with ``eval_reference``, ``eval_report_path``
    and ``eval_max_new_tokens``; validation logs ``split/metric`` aggregates, test also writes the report.
    """

    def setup(self, stage: str) -> None:
        setup_evaluator(self)

    def on_validation_start(self) -> None:
        prepare_reference(self)

    def on_test_start(self) -> None:
        prepare_reference(self)

    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        evaluation_step(self, batch, dataloader_idx)

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        evaluation_step(self, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        evaluation_epoch_end(self, write_report=False)

    def on_test_epoch_end(self) -> None:
        evaluation_epoch_end(self, write_report=True)
