"""The quantization attack: the model under test with its weights quantized to 8 or 4 bits.

Two backends (``backend``):

* ``bitsandbytes``: ``transformers``' ``BitsAndBytesConfig`` at load time: ``LLM.int8()`` for 8 bits, NF4
  (double quantization, compute in the model's dtype) for 4 bits, every linear layer but the LM head (the
  library's default). Runs on CPU with bitsandbytes ≥ 0.45 and on CUDA.
* ``torch``: a weight-only round-to-nearest quantizer written here: each linear weight except the LM head is
  replaced in place by its symmetric per-output-row absmax quantization to ``2**(bits-1) - 1`` levels a side
  (:func:`quantize_rows`), dequantized back to the model's dtype. No kernels needed; what Zhang et al. (2024)
  call round-to-nearest weight-only quantization.

``auto`` picks bitsandbytes when it imports, else torch; the backend that ran is reported with the results.
"""

from __future__ import annotations

from typing import Any

import torch

BACKENDS = ("auto", "bitsandbytes", "torch")
BITS = (4, 8)


def quantize_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row absmax round-to-nearest quantization of ``weight`` ``[O, I]``, dequantized.

    Each row is scaled by ``absmax / q`` with ``q = 2**(bits-1) - 1`` and rounded to the integers in
    ``[-q, q]``; an all-zero row stays zero. Returns a tensor of ``weight``'s shape and dtype.
    """
    if bits < 2:
        raise ValueError(f"bits={bits}: must be >= 2")
    q = 2 ** (bits - 1) - 1
    w = weight.detach().float()  # [O, I]
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / q  # [O, 1]
    return (torch.round(w / scale).clamp(-q, q) * scale).to(weight.dtype)  # [O, I]


def _is_lm_head(name: str, module: torch.nn.Module, model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module is head or name.split(".")[-1] == "lm_head"


@torch.no_grad()
def quantize_linear_weights_(model: torch.nn.Module, bits: int) -> int:
    """Replace every ``nn.Linear`` weight but the LM head by :func:`quantize_rows` in place.

    Returns:
        The number of layers quantized.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _is_lm_head(name, module, model):
            module.weight.copy_(quantize_rows(module.weight, bits))
            n += 1
    return n


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports (its CPU backend included)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is "not available"
        return False
    return True


def resolve_backend(backend: str) -> str:
    """The backend that will run for ``backend`` (``auto`` resolved)."""
    if backend not in BACKENDS:
        raise ValueError(f"quantization.backend={backend!r}: choose one of {BACKENDS}")
    if backend == "auto":
        return "bitsandbytes" if bitsandbytes_available() else "torch"
    if backend == "bitsandbytes" and not bitsandbytes_available():
        raise ValueError("quantization.backend='bitsandbytes': bitsandbytes does not import here; use 'torch' or 'auto'")
    return backend


def load_quantized(path: str, bits: int, backend: str = "auto", dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False) -> tuple[Any, str]:
    """Load the causal LM at ``path`` with its weights quantized to ``bits``.

    Returns:
        ``(model, backend that ran)``; the model in eval mode, on CPU (torch backend) or where bitsandbytes put it.
    """
    from transformers import AutoModelForCausalLM

    if bits not in BITS:
        raise ValueError(f"quantization.bits: {bits} is not one of {BITS}")
    used = resolve_backend(backend)
    if used == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        cfg = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
               BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype))
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=dtype, device_map=device,
                                                     trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        quantize_linear_weights_(model, bits)
    return model.eval(), used
