"""A shareable export of a trained policy: an HF directory that moves, loads alone and can be pushed to the Hub.

:func:`write_export` writes (into ``<dir>.partial``, then swapped into place, so an interrupted write never leaves
a half-written export where a good one was):

* the model: full fine-tuning, plain weights (safetensors); (Q)LoRA, the adapters with
  ``adapter_config.json`` naming the base **as given** when it is a hub id, or as an **absolute** path when it is
  a local directory (a relative path would break as soon as the directory moves or the working directory
  changes); with ``merge`` the adapters go to ``<dir>/adapter`` and ``<dir>`` holds the base with them merged,
  loadable by ``AutoModelForCausalLM.from_pretrained`` with no peft;
* the tokenizer, and a ``generation_config.json`` whose ``eos_token_id`` lists every stop id the run used
  (the tokenizer's EOS ∪ the model's own ∪ ``stop_token_ids``: a chat model's end-of-turn included);
* ``README.md``, a model card: method, base model, data, the run's configuration and its evaluation numbers
  (:func:`model_card`); ``rerule_export.json``, the same facts as JSON (step, final or checkpoint export).

:func:`push_export` uploads the directory with ``huggingface_hub.HfApi`` (the token from ``HF_TOKEN`` or the
Hub login), the only network call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rerule_lightning.primitives.policy import is_peft, looks_local, save_policy

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ExportConfig:
    """How ``export_dir`` is written (the directory itself stays the module's ``export_dir``).

    Attributes:
        merge: Under (Q)LoRA, write the base with the adapters merged (plain weights, loadable without peft;
            the adapters kept in ``export_dir/adapter``). ``None``: the module's default (the SFT module's
            ``export_merged``, else adapters only).
        push_to_hub: A Hub repository ``owner/name`` to upload the final export to (needs ``HF_TOKEN`` or a Hub
            login); ``None`` uploads nothing.
        private: Create the Hub repository private.
        model_card: Write ``README.md`` (method, config, data, evaluation numbers) into the export.
    """

    merge: bool | None = None
    push_to_hub: str | None = None
    private: bool = True
    model_card: bool = True

    def __post_init__(self) -> None:
        if self.push_to_hub is not None and not REPO_ID.match(str(self.push_to_hub)):
            raise ValueError(f"export.push_to_hub={self.push_to_hub!r}: expected a Hub repository id 'owner/name'")


def base_as_given(name_or_path: str) -> str:
    """A hub id unchanged; a local directory as an absolute path (so that the export moves)."""
    expanded = os.path.expanduser(name_or_path)
    if looks_local(name_or_path) or os.path.isdir(expanded):
        return os.path.abspath(expanded)
    return name_or_path


def _fix_adapter_base(adapter_dir: str, base: str) -> None:
    path = os.path.join(adapter_dir, "adapter_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = base
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


def write_generation_config(path: str, eos_ids: Sequence[int], pad_token_id: int | None) -> None:
    """``generation_config.json`` in ``path`` with ``eos_token_id = eos_ids`` (other fields kept)."""
    from transformers import GenerationConfig

    try:
        gc = GenerationConfig.from_pretrained(path)
    except OSError:
        gc = GenerationConfig()
    gc.eos_token_id = list(eos_ids) if len(eos_ids) != 1 else int(eos_ids[0])
    if pad_token_id is not None:
        gc.pad_token_id = int(pad_token_id)
    gc.save_pretrained(path)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(info: Mapping[str, Any]) -> str:
    """The export's ``README.md``: a Hub model card (YAML front matter) with the run's method, base model, data,
    configuration and evaluation numbers.

    Args:
        info: ``method``, ``base_model``, ``data`` (mapping), ``config`` (mapping: the module's settings),
            ``metrics`` (name -> number), ``step``, ``final`` (bool), ``command`` (optional).
    """
    base = info.get("base_model", "")
    lines = ["---", "library_name: transformers", "tags: [unlearning, rerule-lightning]"]
    if base and not base.startswith("/"):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {info.get('method', 'model')} export", ""]
    state = "final export (end of fit)" if info.get("final") else "checkpoint export (the run was still going)"
    lines += [f"Trained with rerule-lightning: **{info.get('method', '?')}**, from `{base}`; {state} at step "
              f"{info.get('step', '?')}.", ""]
    if info.get("command"):
        lines += ["Command:", "", "```", str(info["command"]), "```", ""]
    lines += ["## Data", ""]
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in (info.get("data") or {}).items()] or ["- (not recorded)"]
    lines += ["", "## Evaluation", ""]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    else:
        lines += ["No evaluation ran in this fit; evaluate with `rerule test --config configs/<benchmark>/eval.yaml "
                  "--model.init_args.policy.name_or_path <this directory>`."]
    lines += ["", "## Configuration", "", "```json", json.dumps(info.get("config") or {}, indent=2, default=str),
              "```", ""]
    return "\n".join(lines)


def write_export(model: torch.nn.Module, tokenizer: Any, path: str, *, merge: bool = False, dtype: str = "float32",
                 trust_remote_code: bool = False, base_model: str | None = None,
                 eos_ids: Sequence[int] | None = None, info: Mapping[str, Any] | None = None) -> str:
    """Write the export directory ``path`` (module docstring); returns ``path``.

    Args:
        model: The policy (a ``PeftModel`` under (Q)LoRA).
        tokenizer: Its tokenizer.
        path: The export directory (replaced).
        merge: Merge (Q)LoRA adapters into plain weights.
        dtype: The merged weights' dtype (the policy's).
        trust_remote_code: For loading the base when merging.
        base_model: The base model as configured (hub id or path), recorded by :func:`base_as_given`.
        eos_ids: The run's stop ids for ``generation_config.json``.
        info: Model-card facts (:func:`model_card`); ``None`` writes no card.
    """
    path = os.path.abspath(path)
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    base = base_as_given(base_model) if base_model else None
    if is_peft(model) and base is not None:  # merging loads the base from the adapter config: make it absolute
        for cfg in getattr(model, "peft_config", {}).values():
            cfg.base_model_name_or_path = base
    save_policy(model, tokenizer, partial, merge=merge, dtype=dtype, trust_remote_code=trust_remote_code)
    if base is not None:
        for d in (partial, os.path.join(partial, "adapter")):
            _fix_adapter_base(d, base)
    if eos_ids:
        write_generation_config(partial, eos_ids, getattr(tokenizer, "pad_token_id", None))
    if info is not None:
        with open(os.path.join(partial, "README.md"), "w") as f:
            f.write(model_card({**info, "base_model": base or info.get("base_model", "")}))
        with open(os.path.join(partial, "rerule_export.json"), "w") as f:
            json.dump({k: info.get(k) for k in ("method", "step", "final", "metrics")} | {"base_model": base},
                      f, indent=2, default=str)
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def push_export(path: str, repo_id: str, private: bool = True, commit_message: str | None = None) -> str:
    """Upload the export directory to the Hub repository ``repo_id`` (created if missing); returns its URL.

    Raises:
        RuntimeError: When the Hub refuses (no token, no permission), naming the repository and the reason.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=path, repo_id=repo_id, repo_type="model",
                          commit_message=commit_message or "rerule-lightning export")
    except Exception as e:  # noqa: BLE001 (the Hub's errors vary; one line naming the repository)
        raise RuntimeError(f"export.push_to_hub={repo_id!r}: upload of {path} failed: {type(e).__name__}: {e} "
                           "(set HF_TOKEN to a token with write access)") from None
    return f"https://huggingface.co/{repo_id}"


__all__ = ["ExportConfig", "base_as_given", "model_card", "push_export", "write_export", "write_generation_config"]
