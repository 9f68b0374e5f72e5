"""One prepared GPU check: GRPO at RULE's batch (32 prompts x 8 completions) with micro-batching on a randomly
initialised model of a real 8 B architecture (Llama-3-8B dimensions; nothing is downloaded), under QLoRA and
LoRA-bf16, printing peak GPU memory and step time.

    python benchmarks/gpu_check.py                          # GPU: Llama-3-8B dimensions, 3 steps per mode
    python benchmarks/gpu_check.py --tiny --prompts 4 --generations 4 --steps 2    # CPU: the same code, tiny model

Per mode it builds the policy through the module's own ``configure_model`` (QLoRA: 4-bit NF4 base, bf16 compute),
samples, scores (RULE's reward on synthetic prompts), and runs micro-batched forward / backward and one
optimizer step per rollout batch, exactly as ``rerule fit`` does. Printed per mode: seconds per step (steps after
the first) and peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS, which includes
every earlier mode). Random weights sample random tokens, so completions run to ``--max_new_tokens``: the
measurement is a worst case for rollout length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Llama-3-8B (Meta-Llama-3-8B-Instruct's config.json).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=1024, tie_word_embeddings=False)
WORDS = [f"w{i}" for i in range(900)]


def build_tokenizer(path: str) -> Any:
    """A word-level tokenizer over a fixed vocabulary (ids below the model's vocabulary), saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS, "Question:", "Answer:", "?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def build_model(path: str, dims: dict[str, Any], dtype: str) -> None:
    """A randomly initialised Llama of ``dims`` saved to ``path`` (built on the GPU when there is one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dims, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def prompts(n: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic prompts, half forget and half boundary (RULE's 1:1 mix), with word references."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
        label = "forget" if i % 2 == 0 else "boundary"
        rows.append({"id": f"p{i}", "prompt": f"Question: {words} ? Answer:", "label": label, "kind": label,
                     "reference": " ".join(rng.choice(WORDS) for _ in range(6)), "value": "", "target": "w0"})
    return rows


class Batches:
    """The training loader: ``steps`` batches of ``b`` prompt rows as column lists (a datamodule's batch)."""

    def __init__(self, b: int, steps: int) -> None:
        rows = prompts(b * steps, 0)
        self.batches = [{c: [r[c] for r in rows[i * b:(i + 1) * b]] for c in rows[0]} for i in range(steps)]

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def run_mode(mode: str, model_dir: str, a: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    from rerule_lightning.modules.grpo import GRPOUnlearningModule
    from rerule_lightning.primitives.policy import PolicyConfig

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda or mode == "qlora" else "float32"
    policy = PolicyConfig(name_or_path=model_dir, peft=mode, dtype=dtype, lora_r=16, lora_alpha=32,
                          gradient_checkpointing=True)
    module = GRPOUnlearningModule(policy=policy, num_generations=a.generations, max_new_tokens=a.max_new_tokens,
                                  micro_batch_size=a.micro_batch_size, generation_batch_size=a.generation_batch_size,
                                  learning_rate=2e-5, beta=0.01, reward="rule", seed=0)
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(max_steps=a.steps, accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()],
                        default_root_dir=tempfile.mkdtemp(prefix="gpu_check_"))
    trainer.fit(module, train_dataloaders=Batches(a.prompts, a.steps))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    out = {"mode": mode, "dtype": dtype, "steps": len(times), "step_s": times,
           "mean_step_s_after_first": sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0],
           "peak_gib": peak, "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
           "trainable_params": trainable, "sequences_per_step": a.prompts * a.generations,
           "micro_batch_size": a.micro_batch_size, "generation_batch_size": a.generation_batch_size}
    del module, trainer
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny Llama (CPU test) instead of Llama-3-8B dimensions")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (RULE: 32)")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (RULE: 8)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=16)
    p.add_argument("--generation_batch_size", type=int, default=None)
    p.add_argument("--modes", default="qlora,lora", help="comma-separated: qlora, lora, full")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--workdir", default=None, help="where the random model is written (default: a temp dir)")
    a = p.parse_args(argv)
    import torch

    from rerule_lightning.cli.lightning_cli import quiet_libraries

    quiet_libraries()

    work = a.workdir or tempfile.mkdtemp(prefix="gpu_check_model_")
    model_dir = os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build_model(model_dir, TINY if a.tiny else LLAMA3_8B, "float32" if a.tiny else "bfloat16")
        build_tokenizer(model_dir)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"gpu_check: {'tiny' if a.tiny else 'Llama-3-8B dims'} on {device}; {a.prompts} x {a.generations} "
          f"sequences per step, micro_batch_size {a.micro_batch_size}, {a.max_new_tokens} new tokens, "
          f"{a.steps} steps", flush=True)
    rows = []
    for mode in a.modes.split(","):
        row = run_mode(mode.strip(), model_dir, a)
        rows.append(row)
        print(f"{row['mode']:6s} ({row['dtype']}): step {row['mean_step_s_after_first']:.2f} s, peak "
              f"{row['peak_gib']:.2f} GiB ({row['peak_kind']}), trainable {row['trainable_params']:,}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
