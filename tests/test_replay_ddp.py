"""Under DDP (2 CPU processes) every rank holds the identical buffer and draws disjoint replay samples."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def run_worker(tiny_prepared: dict, tmp_path, mode: str) -> tuple[dict, dict]:
    """Both ranks' saved states; asserts they hold the identical buffer, statistics and counts."""
    links = tiny_prepared["links"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_replay_worker.py"), links["world"], links["target"],
                           str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    b0, b1 = r0["state"]["buffer"], r1["state"]["buffer"]
    assert len(b0) == len(b1) > 0
    for x, y in zip(b0, b1):
        assert x["group"]["prompt_id"] == y["group"]["prompt_id"] and x["replays"] == y["replays"]
        assert torch.equal(x["group"]["completion_ids"], y["group"]["completion_ids"])
        assert torch.equal(x["group"]["rewards"], y["group"]["rewards"])
    for key in ("totals", "stats", "success", "prompt_replays", "replay_from"):
        assert r0["state"][key] == r1["state"][key], key
    for k, v in r0["params"].items():  # DDP keeps the replicas in sync
        torch.testing.assert_close(v, r1["params"][k])
    return r0, r1


@pytest.mark.parametrize("mode", ["fill", "prompt"])
def test_ddp_fill_and_prompt_replay_keep_ranks_identical(tiny_prepared, tmp_path, mode):
    r0, _ = run_worker(tiny_prepared, tmp_path, mode)
    totals = r0["state"]["totals"]
    assert totals["replayed"] > 0
    if mode == "fill":  # every replay filled a zero-variance slot on some rank
        assert totals["filled"] == totals["replayed"]


def test_ddp_ranks_hold_identical_buffers_and_disjoint_replays(tiny_prepared, tmp_path):
    r0, r1 = run_worker(tiny_prepared, tmp_path, "add")
    b0 = r0["state"]["buffer"]
    # admissions come from both ranks: 2 steps x 2 ranks x 2 prompts = 8 fresh groups were candidates
    assert r0["state"]["totals"]["admitted"] >= len(b0)
    # hybrid steps 2 and 3: each rank got one replayed group per step, never the same one as the other rank
    assert len(r0["replayed"]) == len(r1["replayed"]) == 2
    for step in (2, 3):
        g0 = {(p, s) for p, s, t in r0["replayed"] if t == step}
        g1 = {(p, s) for p, s, t in r1["replayed"] if t == step}
        assert g0 and g1 and not (g0 & g1)
