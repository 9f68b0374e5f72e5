"""Estimate the peak GPU memory of a config's training step (GRPO, rejection steering) or evaluation.

    python benchmarks/memory_estimate.py                      # every config under configs/{tofu,muse_books,muse_news,rwku}
    python benchmarks/memory_estimate.py configs/tofu/rule.yaml --prompt_tokens 128

Nothing is downloaded: model dimensions come from :data:`ARCHS` (matched by a substring of the model id), or
from ``config.json`` when the path is a local directory. Each config is estimated under its own PEFT mode and
the other two (full / LoRA / QLoRA). The components, in bytes (GiB = 2**30 bytes in the table):

* **weights**: full / LoRA: every parameter in ``policy.dtype``; QLoRA: decoder linear weights in 4-bit NF4
  (0.5 byte) + double-quantised constants (one 8-bit absmax per 64 weights + one fp32 per 256 blocks:
  1/64 + 4/16384 byte per weight), and embeddings / lm_head / norms in **float32** (4 bytes):
  ``prepare_model_for_kbit_training`` up-casts every parameter that is not quantised. Full fine-tuning with a
  KL term (GRPO, beta > 0) holds a second, frozen copy (the reference); (Q)LoRA disables adapters instead.
* **trainable**: LoRA: r * (in + out) per adapted linear, fp32 parameter + gradient + 2 AdamW states = 16 bytes;
  full: gradient + 2 AdamW states in ``policy.dtype``, which full fine-tuning requires to be float32 (the weights
  are their own float32 master copy; a bf16 one would round AdamW's small steps away and is refused before
  training): 12 bytes, the parameter's 4 being in weights. **The master-weight choice and its cost**: float32
  weights under ``trainer.precision: bf16-mixed`` (bf16 autocast compute) take 16 bytes per parameter against
  pure bf16's 8 (2 weight + 6 gradient / AdamW); an fp32 master copy beside bf16 weights would cost the same
  16 (2 + 2 + 4 + 8) and a Kahan-compensated bf16 optimizer about 10, but needs a custom optimizer: we take
  Lightning's standard mixed precision. For the TOFU 1B target (1.24 B parameters) that is 18.5 GiB against
  9.2 GiB static (plus the frozen reference, 4.6 GiB in float32, under GRPO with KL); (Q)LoRA adapters are
  float32 at 16 bytes each in every case, so the 8B QLoRA configs pay nothing extra.
* **activations** for n sequences of L tokens per forward / backward (GRPO: n = ``micro_batch_size`` when set,
  else batch_size * num_generations; L = prompt + max_new_tokens; RS: n = batch_size, L = max_length): per token
  and layer 6h + 2h_kv + 4i elements in ``policy.dtype`` (attention: residual, normed input, q, k, v, attention
  output; SwiGLU MLP: residual, normed input, gate, up, act(gate), product). With gradient checkpointing only each
  layer's input (h) is kept, plus one layer's full set recomputed during backward. Activations, logits and the
  kv cache are in the *compute* dtype: bf16 under ``trainer.precision: bf16-mixed``, else ``policy.dtype``. QLoRA: the two normed inputs
  come out of float32 norms, so they are float32: + 2h * (4 - dtype bytes) per token and (kept) layer.
* **logits**: GRPO keeps ``[n, T, V]`` logits of the T completion positions of one micro-batch in
  ``policy.dtype`` and, for the backward of log-softmax, their float32 upcast
  (:func:`rerule_lightning.rl.grpo.token_logprobs`): dtype + 4 bytes per element. QLoRA's float32 lm_head makes the
  logits float32 themselves (4 + 4 bytes) and up-casts its ``[n, T, h]`` input (+ 4 bytes per element). RS (full
  ``[n, L, V]`` logits, float32 cross-entropy) likewise; evaluation only one chunk.
* **per-token tensors** of the whole GRPO batch, kept across micro-batches: behaviour, reference and per-token
  loss log-probs, ``[B*G, T]`` float32 each (3 x 4 bytes per completion token).
* **kv cache** of generation: g * L * layers * 2 * h_kv elements in ``policy.dtype``, g = ``generation_batch_size``
  when set (sequences per ``generate`` call), else B*G (``micro_batch_size`` does not shrink it).
* **overhead**: CUDA context and allocator slack, a flat 1 GiB.

Peak = weights + trainable + overhead + per-token tensors + max(training pass: activations + logits, generation:
kv cache).
These are estimates (no fragmentation model, no fused-kernel savings): measure before trusting the last GiB.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import yaml

GIB = 2 ** 30
OVERHEAD = 1 * GIB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Prompt tokens per benchmark (chat template + question; MUSE prompts carry longer text), by config folder.
PROMPT_TOKENS = {"tofu": 96, "muse_books": 256, "muse_news": 256, "rwku": 96}
BENCHMARK_DIRS = ("tofu", "muse_books", "muse_news", "rwku")
#: ``trainer.precision`` -> the autocast (compute) dtype.
PRECISION_COMPUTE = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


@dataclass(frozen=True)
class Arch:
    """Decoder dimensions: hidden h, layers, attention heads, key/value heads, MLP width i, vocabulary."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    def other_params(self) -> int:
        """Embeddings, lm_head (when untied) and RMSNorm weights."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)


#: Published targets (nothing can be downloaded here). Keys are matched as substrings of the model id.
ARCHS = {
    "Llama-3.2-1B": Arch(2048, 16, 32, 8, 8192, 128256, True),
    "Llama-2-7b": Arch(4096, 32, 32, 32, 11008, 32000, False),
    "MUSE-Books": Arch(4096, 32, 32, 32, 11008, 32000, False),  # muse-bench targets: Llama-2-7B
    "MUSE-News": Arch(4096, 32, 32, 32, 11008, 32000, False),
    "Llama-3-8B": Arch(4096, 32, 32, 8, 14336, 128256, False),
    "Llama-3.1-8B": Arch(4096, 32, 32, 8, 14336, 128256, False),
}


def resolve_arch(name_or_path: str) -> Arch:
    """Dimensions from a local ``config.json``, else from :data:`ARCHS` (``KeyError`` naming the model)."""
    cfg_path = os.path.join(os.path.expanduser(name_or_path), "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            c = json.load(f)
        return Arch(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                    c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"], c["vocab_size"],
                    bool(c.get("tie_word_embeddings", False)))
    for key in sorted(ARCHS, key=len, reverse=True):
        if key.lower() in name_or_path.lower():
            return ARCHS[key]
    raise KeyError(f"no dimensions for {name_or_path!r}: add it to ARCHS or pass a local directory")


def weight_bytes(arch: Arch, peft: str, dtype_bytes: int) -> float:
    """Base weights: QLoRA quantises the decoder linears to NF4 with double-quantised constants and up-casts the
    rest (embeddings, lm_head, norms) to float32."""
    if peft != "qlora":
        return (arch.linear_params() + arch.other_params()) * dtype_bytes
    n = arch.linear_params()
    return n * 0.5 + n * (1 / 64 + 4 / (64 * 256)) + arch.other_params() * 4


def lora_params(arch: Arch, r: int) -> int:
    """LoRA parameters on every decoder linear (``all-linear``): r * (in + out) each."""
    return arch.layers * sum(r * (a + b) for a, b in arch.linear_shapes())


def trainable_bytes(arch: Arch, peft: str, dtype_bytes: int, r: int) -> float:
    if peft == "full":
        return (arch.linear_params() + arch.other_params()) * dtype_bytes * 3  # gradient + 2 AdamW states
    return lora_params(arch, r) * 16.0


def activation_bytes(arch: Arch, n_seq: int, length: int, dtype_bytes: int, checkpointing: bool,
                     fp32_norms: bool = False) -> float:
    per_layer = 6 * arch.hidden + 2 * arch.kv_dim + 4 * arch.intermediate  # elements per token
    extra = 2 * arch.hidden * (4 - dtype_bytes) if fp32_norms else 0  # bytes per token and full layer (QLoRA)
    tokens = n_seq * length
    if checkpointing:
        return tokens * ((arch.layers * arch.hidden + per_layer) * dtype_bytes + extra)
    return tokens * arch.layers * (per_layer * dtype_bytes + extra)


def kv_cache_bytes(arch: Arch, n_seq: int, length: int, dtype_bytes: int) -> float:
    return n_seq * length * arch.layers * 2 * arch.kv_dim * dtype_bytes


def estimate(arch: Arch, stage: str, peft: str, dtype: str, n_seq: int, prompt: int, completion: int,
             checkpointing: bool, lora_r: int = 16, beta: float = 0.0,
             micro_batch_size: int | None = None, generation_batch_size: int | None = None,
             compute: str | None = None) -> dict[str, float]:
    """Components and peak (bytes) of one step; ``stage`` is ``grpo``, ``rs`` or ``eval`` (module docstring).

    For ``rs`` pass the sequence length as ``prompt`` and 0 as ``completion``. ``n_seq`` is the whole batch
    (GRPO: B*G); ``micro_batch_size`` the sequences of one GRPO forward / backward and ``generation_batch_size``
    those of one rollout ``generate`` call (``None``: all of them).

    ``dtype`` is the weights' (``policy.dtype``), ``compute`` the autocast dtype (``None``: the weights').

    Returns:
        ``weights``, ``trainable``, ``activations``, ``logits``, ``per_token``, ``kv_cache``, ``overhead`` and
        ``peak`` = weights + trainable + overhead + per_token + max(activations + logits, kv_cache).
    """
    wb = DTYPE_BYTES[dtype]
    db = DTYPE_BYTES[compute or dtype]
    q = peft == "qlora"
    n_pass = n_seq if stage != "grpo" or micro_batch_size is None else min(n_seq, micro_batch_size)
    length = prompt + completion
    w = weight_bytes(arch, peft, wb)
    if stage == "grpo" and peft == "full" and beta > 0:
        w *= 2  # frozen reference copy
    out = {"weights": w, "trainable": 0.0 if stage == "eval" else trainable_bytes(arch, peft, wb, lora_r),
           "activations": 0.0, "logits": 0.0, "per_token": 0.0, "kv_cache": 0.0, "overhead": float(OVERHEAD)}
    logit_bytes = 8 if q else db + 4  # QLoRA: float32 lm_head (float32 logits) + the log-softmax upcast
    if stage == "grpo":
        out["activations"] = activation_bytes(arch, n_pass, length, db, checkpointing, fp32_norms=q)
        out["logits"] = n_pass * completion * (arch.vocab * logit_bytes + (arch.hidden * 4 if q else 0))
        out["per_token"] = 3 * 4 * n_seq * completion
        out["kv_cache"] = kv_cache_bytes(arch, n_seq if generation_batch_size is None
                                         else min(n_seq, generation_batch_size), length, db)
    elif stage == "rs":
        out["activations"] = activation_bytes(arch, n_seq, length, db, checkpointing, fp32_norms=q)
        out["logits"] = n_seq * length * (arch.vocab * logit_bytes + (arch.hidden * 4 if q else 0))
    else:
        out["kv_cache"] = kv_cache_bytes(arch, n_seq, length, db)
        out["logits"] = min(n_seq, 8) * completion * arch.vocab * 4 + n_seq * completion * arch.vocab * db
    static = out["weights"] + out["trainable"] + out["overhead"] + out["per_token"]
    out["peak"] = static + max(out["activations"] + out["logits"], out["kv_cache"])
    return out


def _resolves(name: str) -> bool:
    try:
        resolve_arch(name)
        return True
    except KeyError:
        return False


def config_case(path: str, prompt_tokens: int | None = None) -> dict[str, Any]:
    """What :func:`estimate` needs, read from a LightningCLI config (GRPO, SFT or Eval module)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    model, data = cfg["model"], cfg["data"]["init_args"]
    m_args, cls = model.get("init_args", {}), model["class_path"]
    pol = m_args.get("policy", {})
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    prompt = prompt_tokens or PROMPT_TOKENS.get(folder, 128)
    bench = (data.get("benchmark") or {}).get("init_args", {})
    names = [pol.get("name_or_path"), pol.get("tokenizer"), data.get("tokenizer"), bench.get("tokenizer")]
    model_id = next((n for n in names if n and _resolves(n)), names[0] or "?")
    case = {"config": os.path.relpath(path), "model": model_id, "peft": pol.get("peft", "full"),
            "dtype": pol.get("dtype", "float32"), "checkpointing": bool(pol.get("gradient_checkpointing", False)),
            "lora_r": int(pol.get("lora_r", 16)), "beta": float(m_args.get("beta", 0.01)),
            "micro_batch_size": m_args.get("micro_batch_size"),
            "generation_batch_size": m_args.get("generation_batch_size"),
            "compute": PRECISION_COMPUTE.get(str((cfg.get("trainer") or {}).get("precision")))}
    if cls.endswith("GRPOUnlearningModule"):
        g = int(m_args.get("num_generations", 8))
        case.update(stage="grpo", n_seq=int(data.get("batch_size", 16)) * g, prompt=prompt,
                    completion=int(m_args.get("max_new_tokens", 32)))
    elif cls.endswith("SFTModule"):
        case.update(stage="rs", n_seq=int(data.get("batch_size", 8)), prompt=int(data.get("max_length", 512)),
                    completion=0)
    else:
        case.update(stage="eval", n_seq=int(data.get("eval_batch_size", 16)), prompt=prompt,
                    completion=int(m_args.get("eval_max_new_tokens", 32)))
    return case


def rows_for(case: dict[str, Any]) -> list[dict[str, Any]]:
    arch = resolve_arch(case["model"])  # falls back to the tokenizer id (same family) when the start model is a run dir
    modes = [case["peft"]] + [m for m in ("qlora", "lora", "full") if m != case["peft"]]
    if case["stage"] == "eval":
        modes = ["qlora", "full"] if case["peft"] == "qlora" else [case["peft"]]
    rows = []
    compute = case.get("compute") or case["dtype"]
    for m in modes:
        # full fine-tuning trains float32 master weights (bf16 ones are refused) under the config's compute dtype
        dtype = "float32" if m == "full" and case["stage"] != "eval" else case["dtype"]
        if m != "full" and dtype == "float32" and compute != "float32":
            dtype = compute  # (Q)LoRA: the frozen base in the compute dtype
        est = estimate(arch, case["stage"], m, dtype, case["n_seq"], case["prompt"], case["completion"],
                       case["checkpointing"], case["lora_r"], case["beta"], case.get("micro_batch_size"),
                       case.get("generation_batch_size"), compute=compute)
        rows.append({**case, "mode": m + (" (config)" if m == case["peft"] else ""), **est})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["weights", "trainable", "activations", "logits", "kv_cache", "peak"]
    head = "| config | stage | model | peft | N (per pass) x L | " + " | ".join(cols) + " (GiB) |"
    lines = [head, "|" + "---|" * (5 + len(cols))]
    for r in rows:
        mb = r.get("micro_batch_size")
        nl = f"{r['n_seq']}{f' ({mb})' if mb and r['stage'] == 'grpo' else ''} x {r['prompt'] + r['completion']}"
        lines.append(f"| {r['config']} | {r['stage']} | {r['model'].split('/')[-1]} | {r['mode']} | {nl} | "
                     + " | ".join(f"{r[c] / GIB:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", help="config files (default: every benchmark config)")
    parser.add_argument("--prompt_tokens", type=int, default=None, help="prompt length (default: per benchmark)")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = args.configs or sorted(p for d in BENCHMARK_DIRS for p in glob.glob(os.path.join(root, "configs", d, "*.yaml")))
    rows = []
    for p in paths:
        try:
            rows += rows_for(config_case(p, args.prompt_tokens))
        except (KeyError, TypeError) as e:
            print(f"skipped {p}: {e}", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
