"""``benchmarks/gpu_check.py`` on CPU: the GPU check's code path (random-init Llama, micro-batched GRPO under LoRA
and QLoRA, through the module's own configure_model) on a tiny config; its 8 B dimensions are Llama-3-8B's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rerule_lightning.cli.lightning_cli import quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_cpu_path(tmp_path: Path) -> None:
    from test_grpo_module import _bnb_4bit_cpu_error

    quiet_libraries()
    modes = "lora" if _bnb_4bit_cpu_error() else "lora,qlora"
    gc = load("gpu_check")
    rows = gc.main(["--tiny", "--prompts", "4", "--generations", "4", "--steps", "1", "--max_new_tokens", "6",
                    "--micro_batch_size", "4", "--generation_batch_size", "8", "--modes", modes,
                    "--workdir", str(tmp_path), "--json", str(tmp_path / "out.json")])
    assert [r["mode"] for r in rows] == modes.split(",")
    # LoRA r 16 on q, k, v, o, gate, up, down of 2 layers: r * (in + out) each (h 64, kv 32, MLP 128)
    per_layer = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    for r in rows:
        assert r["steps"] == 1 and r["sequences_per_step"] == 16 and r["peak_gib"] > 0
        assert r["trainable_params"] == 2 * per_layer
    assert (tmp_path / "out.json").is_file()


def test_gpu_check_uses_llama3_8b_dimensions() -> None:
    gc, me = load("gpu_check"), load("memory_estimate")
    d, arch = gc.LLAMA3_8B, me.ARCHS["Llama-3-8B"]
    assert (d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"], d["num_key_value_heads"],
            d["intermediate_size"], d["vocab_size"], d["tie_word_embeddings"]) == \
        (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.intermediate, arch.vocab, arch.tied)
