"""Shared fixtures: offline mode, a tiny prepared embedded world (built once per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one store per pytest-xdist worker (``pytest -n 2``): two processes writing one sqlite file can see it locked
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + os.path.join(
    os.path.dirname(__file__), "..", ".cache", f"test-mlflow-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.db"))

import pytest  # noqa: E402

TINY_WORLD = dict(seed=0, preset="hard", num_families=5, authors_per_family=3, num_forget_families=2,
                  num_boundary_easy_families=2, num_holdout_authors=3, num_world_facts=4,
                  hard_first_name_collisions=2)
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=96)
TINY_TRAIN = dict(epochs=60, learning_rate=5e-3, warmup_steps=10, batch_size=32, seed=0)


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model or tokenizer fails the test."""
    import transformers

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights or tokenizer loaded while only instantiating a config")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second intra-op thread only waits for a busy core.

    Also the thread count the ``rerule`` commands run in these tests pin (``RERULE_THREADS``)."""
    import torch

    before = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in ("RERULE_THREADS", "OMP_NUM_THREADS")}
    os.environ["RERULE_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    for k, v in saved.items():  # the CLI also sets OMP_NUM_THREADS (for the processes it starts)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``rerule prepare`` on a tiny world (seconds): returns the manifest (paths, links, accuracy)."""
    from datamodules.world import WorldConfig
    from rerule_lightning.cli.lightning_cli import quiet_libraries
    from rerule_lightning.cli.prepare import SFTTrainConfig, prepare
    from rerule_lightning.modules.sft import TinyLlamaConfig

    quiet_libraries()
    # Artefacts are keyed by config hash, so a persistent cache is safe and saves rebuilding between runs.
    cache = os.environ.get("RERULE_TEST_CACHE") or os.path.join(os.path.dirname(__file__), "..", ".cache",
                                                                 "test-fixture")
    return prepare(WorldConfig(**TINY_WORLD), TinyLlamaConfig(**TINY_MODEL), SFTTrainConfig(**TINY_TRAIN),
                   vocab_size=512, cache_dir=str(cache), report=True, progress=False)


#: Chat template of the tiny chat model: one line per message, then the assistant's turn on a new line.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}Assistant:\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny target model copied to a temporary directory, its tokenizer given :data:`TINY_CHAT_TEMPLATE`
    and its ``max_position_embeddings`` raised to 512 (RoPE: no new weights), for real-benchmark tests with
    ``prompt_format: chat`` / ``policy.use_chat_template: true``. Returns the directory."""
    import json
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_chat_model") / "model"
    shutil.copytree(os.path.realpath(tiny_prepared["links"]["target"]), out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_position_embeddings"] = 512
    cfg_path.write_text(json.dumps(cfg, indent=2))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return str(out)
