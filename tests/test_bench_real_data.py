"""The shipped benchmark configs on real rows: ``../shared/real-data/<benchmark>`` holds small subsets of the
published TOFU, MUSE-Books, MUSE-News and RWKU files (with their quirks: an ICL demonstration that is an evaluated
question, an empty raw text, "Please forget X." intros). Each benchmark's RL, rejection-steering and evaluation
dataloaders are built from ``configs/<benchmark>/{rule,rs}.yaml`` (only the source, the tokenizer and the original
model swapped for local ones) and one batch of each is drawn. Skipped when the directory is absent."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-data"
CONFIGS = ROOT / "configs"

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} (real benchmark rows) is absent")


def _build(spec: dict[str, Any], overrides: dict[str, Any]) -> Any:
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**{**spec["init_args"], **overrides})


def _bench_overrides(bench: str, tokenizer: str, cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"source": str(REAL / bench)}
    if bench == "rwku":
        out.update(tokenizer=tokenizer, reference_model=tokenizer, cache_dir=str(cache))
    elif bench == "tofu":
        out["tokenizer"] = tokenizer
    return out


@pytest.mark.parametrize("bench", ["tofu", "muse_books", "muse_news", "rwku"])
def test_shipped_configs_load_the_real_rows(bench: str, tiny_chat_model: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    rule = yaml.safe_load((CONFIGS / bench / "rule.yaml").read_text())
    dm = _build(rule["data"], _bench_overrides(bench, tiny_chat_model, tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == dm.hparams.batch_size and {"forget", "boundary"} <= set(batch["label"])
    loaders = dm.val_dataloader()
    assert len(loaders) == len(dm.eval_splits)
    for split, loader in zip(dm.eval_splits, loaders):
        items = next(iter(loader))
        assert items["id"] and all(s == split for s in items["split"]), split
    notes = capsys.readouterr().out
    if bench == "muse_books":
        assert "knowmem retain_qa_icl: 1 demonstration(s) also asked as 2 evaluated retain_qa question(s)" in notes
    if bench == "muse_news":
        assert "raw forget: skipped 1 of 24 rows with empty text (rows [21])" in notes
    if bench == "rwku":
        assert "removed the leading \"Please forget X.\" sentence from 7 of 7 intros" in notes


@pytest.mark.parametrize("bench", ["tofu", "muse_books", "muse_news", "rwku"])
def test_shipped_rs_configs_build_rejection_steering_batches_from_real_rows(bench: str, tiny_chat_model: str,
                                                                            tmp_path: Path) -> None:
    rs = yaml.safe_load((CONFIGS / bench / "rs.yaml").read_text())["data"]
    inner = rs["init_args"]["benchmark"]
    bench_dm = _build(inner, _bench_overrides(bench, tiny_chat_model, tmp_path))
    args = {k: v for k, v in rs["init_args"].items() if k != "benchmark"}
    module, name = rs["class_path"].rsplit(".", 1)
    # relaxed here: the size floor (the real subsets are small; the full data meets it) and max_length (the tiny
    # world's 512-token BPE splits real text into several times more tokens than the targets' tokenizers)
    dm = getattr(importlib.import_module(module), name)(benchmark=bench_dm, **{**args, "tokenizer": tiny_chat_model,
                                                                                   "min_refusals": 1,
                                                                                   "max_length": 4096})
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] >= 1
    assert any(p["kind"] == "refusal" for p in dm.pairs)
