"""Policy building: full fine-tuning, LoRA (peft) or QLoRA (bitsandbytes 4-bit NF4 + LoRA).

Everything here is called from ``LightningModule.configure_model``, so parsing and instantiating a config
never loads weights. With (Q)LoRA the KL reference is the same base weights with the adapters disabled
(:func:`reference_context`), so no second copy of the model is held in memory. With full fine-tuning the
reference is a separate frozen copy loaded from ``reference_path`` (defaults to the start checkpoint).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import torch

from rerule_lightning.primitives.ranges import POSITIVE, Count, UnitBelowOne, range_errors

PeftMode = Literal["full", "lora", "qlora"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PolicyConfig:
    """Which model to train and how.

    Attributes:
        name_or_path: Hugging Face model id or local directory of an ``AutoModelForCausalLM``.
        tokenizer: Tokenizer id or directory; defaults to ``name_or_path``.
        peft: ``full`` fine-tuning, ``lora`` adapters, or ``qlora`` (4-bit NF4 base + LoRA adapters).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: Dropout on the LoRA path.
        lora_target_modules: Module names to adapt, or ``all-linear``.
        dtype: Parameter / compute dtype of the base model (``float32``, ``bfloat16``, ``float16``).
        trust_remote_code: Allow model repositories to run their own Python code. Off unless you set it.
        gradient_checkpointing: Trade compute for memory in the backward pass.
        use_chat_template: Format prompts with the tokenizer's chat template (instruct models).
    """

    name_or_path: str = ".cache/rerule/embedded/target"
    tokenizer: str | None = None
    peft: PeftMode = "full"
    lora_r: Count = 16
    lora_alpha: Annotated[int, POSITIVE] = 32
    lora_dropout: UnitBelowOne = 0.0
    lora_target_modules: list[str] | str = field(default_factory=lambda: "all-linear")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        if self.peft not in ("full", "lora", "qlora"):
            raise ValueError(f"policy.peft={self.peft!r}: choose 'full', 'lora' or 'qlora'")
        if self.dtype not in _DTYPES:
            raise ValueError(f"policy.dtype={self.dtype!r}: choose one of {sorted(_DTYPES)}")
        if errors := range_errors(PolicyConfig, vars(self), "policy."):
            raise ValueError("; ".join(errors))


def plain_hparams(module: object, **configs: object) -> None:
    """Store dataclass arguments in ``module.hparams`` as plain dicts.

    Checkpoints then hold only plain types and load with ``torch.load(weights_only=True)``; a dataclass in
    ``hparams`` would need an unpickling allow-list.
    """
    for name, cfg in configs.items():
        module.hparams[name] = None if cfg is None else asdict(cfg)


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local path rather than a hub id (hub ids are ``org/name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") >= 2


def missing_path_hint(path: str) -> str:
    """What produces a missing model directory of the shipped configs (their ``export_dir`` layout)."""
    parts = os.path.normpath(path).split(os.sep)
    if "runs" in parts[:-1]:
        tail = parts[parts.index("runs") + 1:]
        if len(tail) >= 2 and tail[0] == "baselines":
            return (f"It is the export of the baseline {tail[1]!r}: run "
                    f"`rerule fit --config configs/baselines/{tail[1]}.yaml` first.")
        if len(tail) >= 3 and tail[0] == "tofu" and tail[2] in ("rs", "rule"):  # the model axis' run directories
            folder = "models/" if tail[2] == "rule" else f"models/{tail[2]}/"
            return (f"It is the export of the tofu stage {tail[2]!r} of model {tail[1]!r}: run `rerule fit --config "
                    f"configs/tofu/{tail[2]}.yaml --config configs/{folder}{tail[1]}.yaml` first.")
        if len(tail) >= 2 and tail[0] in ("tofu", "muse_books", "muse_news", "rwku"):
            config = (f"configs/{tail[0]}/{tail[1]}.yaml" if tail[1] in ("rs", "rule")
                      else f"configs/baselines/{tail[0]}_{tail[1]}.yaml")  # e.g. tofu/npo: a baseline
            return f"It is the export of the {tail[0]} stage {tail[1]!r}: run `rerule fit --config {config}` first."
        if len(tail) == 1 and tail[0] in ("rs", "rule"):
            return (f"It is the export of the embedded stage {tail[0]!r}: run "
                    f"`rerule fit --config configs/embedded/{tail[0]}.yaml` first.")
    return "For the embedded world run `rerule prepare --config configs/embedded/prepare.yaml` first."


def check_local_path(path: str, what: str) -> None:
    """Fail early, naming the flag, when a local-looking path does not exist (with what would produce it)."""
    if looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"{what}={path!r}: directory not found. {missing_path_hint(path)}")


def load_tokenizer(cfg: PolicyConfig) -> Any:
    """Load the tokenizer, with left padding (for generation) and a pad token."""
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.name_or_path
    check_local_path(path, "policy.tokenizer" if cfg.tokenizer else "policy.name_or_path")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_base_model(path: str, cfg: PolicyConfig, quantize: bool = False) -> torch.nn.Module:
    """Load an ``AutoModelForCausalLM``, optionally quantised to 4-bit NF4."""
    from transformers import AutoModelForCausalLM

    check_local_path(path, "policy.name_or_path")
    kwargs: dict[str, Any] = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_DTYPES[cfg.dtype] if cfg.dtype != "float32" else torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


#: Trainer precisions that cast every parameter, trainable ones included, to a 16-bit type (no float32 master).
TRUE_HALF_PRECISIONS = ("bf16-true", "16-true")


def master_weight_error(cfg: PolicyConfig, precision: str | None = None) -> str | None:
    """Why training ``cfg`` would keep a trainable parameter in bf16 / fp16 with no float32 master copy (``None``
    when every trainable parameter is float32).

    AdamW's update of a weight is about ``lr``; a bf16 weight near 0.02 has a resolution (ulp) near 1e-4, so
    updates at RULE's rates (4e-7 .. 2e-5) round away and most weights never move. Float32 master weights
    cost 2 bytes per trainable parameter over bf16 ones (``benchmarks/memory_estimate.py``); (Q)LoRA adapters
    are float32 whatever ``dtype`` (their base stays in ``dtype`` / 4-bit, frozen).

    Args:
        cfg: The policy.
        precision: ``trainer.precision`` (``None``: unknown, only ``cfg`` is checked).
    """
    if precision is not None and str(precision) in TRUE_HALF_PRECISIONS:
        return (f"--trainer.precision={precision} casts the trainable weights to 16 bits with no float32 master "
                "copy, so small AdamW updates round away: use bf16-mixed (or 16-mixed) instead")
    if cfg.peft == "full" and cfg.dtype != "float32":
        return (f"policy.dtype={cfg.dtype} with policy.peft=full trains {cfg.dtype} weights with no float32 master "
                f"copy (AdamW steps near lr 1e-5 round away on weights near 0.02): set "
                "--model.init_args.policy.dtype float32 and --trainer.precision bf16-mixed (float32 master weights, "
                "bf16 compute), or train adapters (policy.peft lora / qlora)")
    return None


def adapters_in_float32(model: torch.nn.Module) -> None:
    """Cast every trainable parameter to float32 (the (Q)LoRA adapters; their frozen base keeps its dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def build_policy(cfg: PolicyConfig) -> torch.nn.Module:
    """Build the trainable policy described by ``cfg``; every trainable parameter is float32.

    Returns:
        The model; under (Q)LoRA a ``PeftModel`` whose only trainable parameters are the adapters (float32).

    Raises:
        ValueError: Full fine-tuning in bf16 / fp16 (:func:`master_weight_error`), before any weight is loaded.
    """
    problem = master_weight_error(cfg)
    if problem:
        raise ValueError(problem)
    model = load_base_model(cfg.name_or_path, cfg, quantize=cfg.peft == "qlora")
    if cfg.peft == "full":
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        if cfg.peft == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
            _keep_4bit_trainable_on_cpu(model)
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        adapters_in_float32(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-re-entrant gradient checkpointing, with input gradients enabled under (Q)LoRA.

    Re-entrant checkpointing (the default of older transformers) back-propagates through a checkpointed block
    only if one of its tensor inputs requires grad. Under (Q)LoRA the frozen embedding's output does not, so
    every adapter inside would get no gradient ("element 0 of tensors does not require grad" on transformers
    4.57). Non-re-entrant checkpointing has no such condition; the input gradients cover a model class that
    ignores ``gradient_checkpointing_kwargs``.
    """
    if not hasattr(model, "gradient_checkpointing_enable"):
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_peft(model) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _keep_4bit_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a ``Linear4bit`` repacks its weight into an inference-only layout on its
    first eval-mode forward without grad (every rollout's ``generate``) and never unpacks it when training
    resumes; from then on its matmul has no autograd kernel, so no gradient flows back through the frozen
    base layers and every adapter before the last one in a block silently stops learning.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries peft adapters (so the reference is the adapter-free base)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_context(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its reference: adapters disabled under (Q)LoRA; a no-op otherwise."""
    if is_peft(model):
        with model.disable_adapter():
            yield
    else:
        yield


def save_policy(model: torch.nn.Module, tokenizer: Any, path: str, merge: bool = False,
                dtype: str = "float32", trust_remote_code: bool = False) -> None:
    """Save an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Under (Q)LoRA only the adapters are written, with ``adapter_config.json`` naming the base model;
    transformers loads such a directory (base + adapters) when peft is installed. With ``merge`` the adapters
    go to ``path/adapter`` and ``path`` holds plain weights (:func:`merge_adapters`), so a later stage that
    starts from ``path`` under (Q)LoRA has this model, not the original base, as its adapter-free reference.
    """
    os.makedirs(path, exist_ok=True)
    if merge and is_peft(model):
        adapter_dir = os.path.join(path, "adapter")
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        merged = merge_adapters(adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        merged.save_pretrained(path)
        del merged
    else:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def merge_adapters(adapter_dir: str, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """The base model named in ``adapter_dir/adapter_config.json``, loaded unquantised in ``dtype``, with the
    LoRA adapters of ``adapter_dir`` merged into its weights (the usual way to export a QLoRA fit)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base_path = json.load(f)["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
