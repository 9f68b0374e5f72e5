"""benchmarks/robustness.py: model discovery from a baselines output, the table, end to end on the tiny world."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from benchmarks import robustness


def test_models_from_a_baselines_output(tmp_path: Path) -> None:
    (tmp_path / "references").mkdir()
    (tmp_path / "results.json").write_text(json.dumps({"runs": [
        {"kind": "select", "method": "NPO"}, {"kind": "final", "method": "NPO", "seed": 1},
        {"kind": "final", "method": "GA+GDR", "seed": 0}, {"kind": "final", "method": "NPO+KLR", "seed": 0},
        {"kind": "final", "method": "NPO", "seed": 5}]}))
    (tmp_path / "references" / "results.json").write_text(json.dumps({"runs": [
        {"stage": "rejection steering", "seed": 0, "preset": None},
        {"stage": "ReRULE (fill, group adv.)", "seed": 0, "preset": "hard"},
        {"stage": "random replay", "seed": 0, "preset": "hard"}, {"stage": "RULE", "seed": 1, "preset": "hard"}]}))
    got = robustness.models_from(str(tmp_path), [0, 1])
    d = str(tmp_path)
    assert got == [("RS", 0, f"{d}/references/seed0/rs"), ("RULE", 1, f"{d}/references/seed1/hard/rule"),
                   ("ReRULE", 0, f"{d}/references/seed0/hard/rerule__fill__group_adv__"),
                   ("GA+GDR", 0, f"{d}/seed0/ga_gdr"), ("NPO", 1, f"{d}/seed1/npo")]


@pytest.mark.slow
def test_robustness_benchmark_end_to_end_on_the_tiny_world(tiny_prepared: dict, tmp_path: Path,
                                                          one_torch_thread: None) -> None:
    cache = os.path.dirname(os.path.dirname(tiny_prepared["links"]["world"]))
    out = tmp_path / "bench"
    argv = ["--seeds", "0", "1", "--cache_dir", cache, "--output_dir", str(out), "--threads", "1",
            "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--model", "retain again", "0", tiny_prepared["links"]["retain"],
            "--attack_args", "--max_new_tokens", "24", "--adversarial.num_demos", "1", "--sampling.ks", "[1, 4]",
            "--relearning.steps", "[2, 4]", "--relearning.peft", "[full]", "--quantization.bits", "[8]",
            "--data.init_args.eval_splits", "[forget, boundary_hard]", "--sampling.splits", "[forget]",
            "--quantization.splits", "[forget]", "--adversarial.kinds", "[prefix_injection, reverse_query]"]
    assert robustness.main(argv) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("retain again", 0), ("target (control)", 0),
                                                         ("target (control)", 1), ("retain (control)", 0),
                                                         ("retain (control)", 1)]
    target = runs[1]["headline"]
    assert target["greedy forget accuracy"] == 1.0 and target["greedy forget refusal"] == 0.0
    assert set(target) == {"greedy forget accuracy", "greedy forget refusal", "leak@4 Δ", "8bit Δ",
                           "relearn full best Δ", "adversarial best Δ"}
    retain = runs[3]["headline"]
    assert retain["greedy forget accuracy"] <= 2 / 36 and retain["relearn full best Δ"] <= 2 / 18 + 1e-9
    md = (out / "robustness.md").read_text()
    assert "| target (control) | 2 | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] |" in md  # same greedy answers on both seeds
    assert "| retain again | 1 |" in md
    assert (out / "robustness.png").stat().st_size > 1000
    attack = json.loads((out / "seed1" / "target__control_" / "attack.json").read_text())
    assert attack["config"]["seed"] == 1 and attack["config"]["relearning"]["models"] == ["model"]
    # resumable: a rerun attacks nothing and rebuilds the same table
    before = (out / "robustness.md").read_text()
    assert robustness.main(argv) == 0 and (out / "robustness.md").read_text() == before
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 5
    assert math.isfinite(runs[2]["seconds"])
