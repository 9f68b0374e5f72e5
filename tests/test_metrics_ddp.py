"""Metrics computed in one process equal those computed in two CPU processes (gloo), each rank updating
with its share of the items: an uneven split, a very uneven one and one where rank 0 sees nothing."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N_ITEMS = 11
SPLITS = {"uneven": 5, "very_uneven": 2, "rank0_empty": 0}  # rank 0 gets items [0, cut), rank 1 the rest


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1234)
    words = "the cat sat on a mat Paris was born in 1962 Kuwait city running runs novel".split()
    idx = torch.randint(0, len(words), (N_ITEMS, 2, 6), generator=g)
    preds = [" ".join(words[j] for j in idx[i, 0]) for i in range(N_ITEMS)]
    refs = [" ".join(words[j] for j in idx[i, 1, :3]) for i in range(N_ITEMS)]
    word_pos = [0, 5, 2, 0, 3, 1, 4, 0, 2, 5, 1]  # which completion word is the answer value
    values = [words[int(idx[i, 0, word_pos[i]])] for i in range(N_ITEMS)]
    values[1] = "Tokyo"  # not in the completion
    preds[3] = "I'm sorry, but I can't share information about " + values[3]  # a refusal with the value
    return {
        "preds": preds,
        "refs": refs,
        "values": values,
        "pert": torch.rand(N_ITEMS, 4, generator=g, dtype=torch.float64) * 3,  # [N, P]
        "para": torch.rand(N_ITEMS, generator=g, dtype=torch.float64) * 3,  # [N]
        "lp": -torch.rand(N_ITEMS, 9, generator=g, dtype=torch.float64) * 5,  # [N, L]
        "mask": torch.rand(N_ITEMS, 9, generator=g) > 0.2,  # [N, L]
        "member": torch.rand(N_ITEMS, generator=g) > 0.5,  # [N]
        "target": torch.randint(0, 3, (N_ITEMS, 9), generator=g),  # [N, L]
        "pred": torch.randint(0, 3, (N_ITEMS, 9), generator=g),  # [N, L]
        "retain_tr": torch.rand(8, generator=g, dtype=torch.float64) * 2,  # [M]
    }


def _compute_all(items: slice) -> dict[str, Any]:
    """Update every metric with ``items`` (no update at all when empty) and compute them."""
    from rerule_lightning.evaluation.metrics import (
        AnswerAccuracy,
        ExtractionStrength,
        ForgetQuality,
        MembershipAUC,
        MinKPercent,
        PrivLeak,
        RougeLRecall,
        TruthRatio,
        truth_ratio,
    )

    d = _data()
    metrics = {
        "answer_accuracy": AnswerAccuracy(),
        "rouge_l_recall": RougeLRecall(),
        "truth_ratio_forget": TruthRatio("forget"),
        "truth_ratio_retain": TruthRatio("retain"),
        "forget_quality": ForgetQuality(retain_truth_ratios=d["retain_tr"]),
        "min_k": MinKPercent(k=0.4),
        "auc": MembershipAUC(),
        "privleak": PrivLeak(auc_retain=0.5),
        "extraction_strength": ExtractionStrength(),
    }
    for m in metrics.values():
        m.to("cpu")  # a device move must not break float64 state gathering
    if items.stop is None or items.stop > (items.start or 0):
        scores = torch.nan_to_num(  # [n]
            __import__("rerule_lightning.evaluation.metrics", fromlist=["min_k_percent"]).min_k_percent(
                d["lp"][items], d["mask"][items]), nan=0.0)
        metrics["answer_accuracy"].update(d["preds"][items], d["values"][items])
        metrics["rouge_l_recall"].update(d["preds"][items], d["refs"][items])
        metrics["truth_ratio_forget"].update(d["pert"][items], d["para"][items])
        metrics["truth_ratio_retain"].update(d["pert"][items], d["para"][items])
        metrics["forget_quality"].update(truth_ratio(d["pert"][items], d["para"][items]))
        metrics["min_k"].update(d["lp"][items], d["mask"][items])
        metrics["auc"].update(scores, d["member"][items])
        metrics["privleak"].update(scores, d["member"][items])
        metrics["extraction_strength"].update(d["pred"][items], d["target"][items], d["mask"][items])
    out: dict[str, Any] = {name: float(m.compute()) for name, m in metrics.items()}
    out["truth_ratio_per_item"] = sorted(metrics["truth_ratio_forget"].per_item().tolist())
    out["min_k_per_item"] = sorted(metrics["min_k"].per_item().tolist())
    return out


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results = {}
        for name, cut in SPLITS.items():
            results[name] = _compute_all(slice(0, cut) if rank == 0 else slice(cut, None))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return _compute_all(slice(None))


@pytest.fixture(scope="module")
def ddp_results(single: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out_dir = tmp_path_factory.mktemp("ddp_metrics")
    linux = sys.platform.startswith("linux")
    # fork (Linux) reuses the modules ``single`` already imported (torchmetrics takes seconds to import);
    # elsewhere spawn
    method = "fork" if linux and "fork" in mp.get_all_start_methods() else "spawn"
    with pytest.MonkeyPatch.context() as mp_env:
        if linux and "GLOO_SOCKET_IFNAME" not in os.environ:
            mp_env.setenv("GLOO_SOCKET_IFNAME", "lo")  # inherited by the ranks; keep gloo on loopback
        mp.start_processes(_worker, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True,
                           start_method=method)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


SCALARS = ["answer_accuracy", "rouge_l_recall", "truth_ratio_forget", "truth_ratio_retain", "forget_quality",
           "min_k", "auc", "privleak", "extraction_strength"]


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", SCALARS)
def test_ddp_scalar_equals_single_process(ddp_results: list[dict[str, Any]], single: dict[str, Any],
                                          split: str, name: str) -> None:
    for rank in range(2):  # every rank gets the global value
        assert ddp_results[rank][split][name] == pytest.approx(single[name], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("split", list(SPLITS))
def test_ddp_per_item_equals_single_process(ddp_results: list[dict[str, Any]], single: dict[str, Any],
                                            split: str) -> None:
    for rank in range(2):
        for key in ("truth_ratio_per_item", "min_k_per_item"):
            assert len(ddp_results[rank][split][key]) == N_ITEMS
            assert ddp_results[rank][split][key] == pytest.approx(single[key], rel=1e-12)


def test_reference_values_are_not_degenerate(single: dict[str, Any]) -> None:
    # the comparison above means something only if the values are not trivially 0 / 1 / nan
    assert 0.0 < single["answer_accuracy"] < 1.0
    assert 0.0 < single["rouge_l_recall"] < 1.0
    assert 0.0 < single["auc"] < 1.0
    assert 0.0 < single["extraction_strength"] < 1.0
    assert 0.0 < single["forget_quality"] <= 1.0
