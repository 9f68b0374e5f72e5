"""The main job (`rerule demo`) end to end on the tiny world: every stage runs and the table is written."""

from __future__ import annotations

import json
import os

import torch
import yaml
from conftest import TINY_MODEL, TINY_TRAIN, TINY_WORLD


def test_demo_runs_every_stage_and_writes_results(tiny_prepared, tmp_path, capsys, monkeypatch):
    from rerule_lightning.cli.commands import main

    cache = os.path.dirname(os.path.dirname(tiny_prepared["links"]["world"]))  # <cache>/embedded/world
    prep = tmp_path / "prepare.yaml"
    prep.write_text(yaml.safe_dump({"world": TINY_WORLD, "model": TINY_MODEL, "target_training": TINY_TRAIN,
                                    "vocab_size": 512, "progress": False}))
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the demo sets it for its stages; restored afterwards
    try:
        rc = main(["demo", "--prepare_config", str(prep), "--cache_dir", cache, "--rule_steps", "2",
                   "--output_dir", str(tmp_path / "out"), "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                   "--seeds", "[0]", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    assert "rejection steering" in out and "RULE" in out and "ReRULE (hard-case)" in out
    results = json.load(open(tmp_path / "out" / "results.json"))
    stages = [r["stage"] for r in results["rows"]]
    assert stages == ["rejection steering", "RULE", "ReRULE (hard-case)"]
    for row in results["rows"]:
        for key in ("forget/refusal_rate", "boundary_hard/answer_accuracy", "boundary_easy/answer_accuracy",
                    "retain/answer_accuracy"):
            mean, std = row[key]
            assert 0.0 <= mean <= 1.0 and std == 0.0  # one seed
        assert all(ids["fit"] != "-" and ids["eval"] != "-" for ids in row["run_ids"])
    assert (tmp_path / "out" / "results.md").read_text().count("\n") == 2 + 3
    # the cached world and models were reused, not rebuilt
    assert os.path.isdir(tmp_path / "out" / "seed0" / "rs")
    assert os.path.isdir(tmp_path / "out" / "seed0" / "hard" / "rerule__hard_case_")
