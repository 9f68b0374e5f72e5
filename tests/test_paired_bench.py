"""Paired statistics, the per-kind training signal, per-group evaluation summaries and the benchmark's
analysis (tables, disparity criteria), on hand-built values."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from rerule_lightning.evaluation.evaluator import group_summary
from rerule_lightning.rl.grpo import kind_signal
from rerule_lightning.tracking.paired import (
    mean_over,
    paired_differences,
    paired_ratios,
    steps_to_reach,
    t_interval,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import replay_analysis as RA  # noqa: E402


def test_t_interval_by_hand() -> None:
    st = t_interval([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, t_{0.975, 2} = 4.302652729911275 → half-width 4.3027 / sqrt(3) = 2.48414
    assert st.n == 3 and st.mean == 2.0 and st.sd == 1.0
    assert st.low == pytest.approx(2.0 - 2.4841377, abs=1e-6) and st.high == pytest.approx(4.4841377, abs=1e-6)
    assert not st.excludes_zero() and t_interval([1.0, 1.2, 0.9, 1.1]).excludes_zero()
    one = t_interval([0.5, math.nan])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.low)
    with pytest.raises(ValueError, match="no finite values"):
        t_interval([math.nan])


def test_paired_differences_ratios_and_steps() -> None:
    var, base = {0: 0.9, 1: 0.8, 3: 0.5}, {0: 0.7, 1: 0.8, 2: 0.1}
    assert paired_differences(var, base) == {0: pytest.approx(0.2), 1: 0.0}  # seed 2 and 3 unpaired
    assert paired_ratios({0: 11.0, 1: 9.0}, {0: 10.0, 1: 10.0}) == {0: 1.1, 1: 0.9}
    curve = [(10, 0.7), (5, 0.6), (15, 0.8)]
    assert steps_to_reach(curve, 0.7) == 10 and steps_to_reach(curve, 0.6) == 5 and steps_to_reach(curve, 0.9) is None
    assert mean_over(curve, 10) == pytest.approx(0.75) and mean_over(curve, 5, 10) == 0.6
    assert math.isnan(mean_over(curve, 20))


def test_kind_signal_by_hand() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0],   # forget, all equal
                            [0.0, 1.0, 0.5, 0.5],   # boundary_hard, mixed
                            [0.5, 0.5, 0.5, 0.5],   # boundary_hard, all equal
                            [1.0, 1.0, 1.0, 1.0]])  # boundary-easy, all equal
    out = kind_signal(rewards, ["forget", "boundary_hard", "boundary_hard", "boundary-easy"])
    assert set(out) == {f"train/{m}_{k}" for m in ("reward_mean", "zero_std_frac", "groups")
                        for k in ("forget", "boundary_hard", "boundary_easy")}  # key reduced to [a-z0-9_]
    assert out["train/reward_mean_boundary_hard"].item() == 0.5  # (2 + 2) / 8, exact in float32
    assert out["train/zero_std_frac_boundary_hard"].item() == 0.5
    assert out["train/groups_boundary_hard"].item() == 2.0
    assert out["train/zero_std_frac_forget"].item() == 1.0 and out["train/reward_mean_boundary_easy"].item() == 1.0


def test_group_summary_counts_exactly() -> None:
    recs = [{"split": "boundary_hard", "target": "A", "collision": "both", "correct": False, "refusal": True},
            {"split": "boundary_hard", "target": "A", "collision": "both", "correct": True, "refusal": False},
            {"split": "boundary_hard", "target": "B", "collision": "surname", "correct": True, "refusal": False},
            {"split": "forget", "target": "C", "collision": "forget", "correct": None, "refusal": None}]
    out = group_summary(recs)
    assert out["collision"]["boundary_hard"] == {
        "both": {"n": 2, "answer_accuracy": 0.5, "refusal_rate": 0.5},
        "surname": {"n": 1, "answer_accuracy": 1.0, "refusal_rate": 0.0}}
    assert out["target"]["boundary_hard"]["A"]["n"] == 2 and "forget" not in out["collision"]  # not generated


def _record(stage: str, seed: int, preset: str | None, acc: float, train_s: float, curves: dict | None = None,
            **final: float) -> dict:
    return {"stage": stage, "seed": seed, "preset": preset, "train_s": train_s, "fit_s": train_s + 1, "val_s": 1.0,
            "final": {"boundary_hard/answer_accuracy": acc, "forget/refusal_rate": 1.0,
                      "boundary_easy/answer_accuracy": 0.95, "retain/answer_accuracy": 0.9,
                      "boundary_hard/refusal_rate": 1 - acc, **final},
            "by_group": {}, "curves": curves or {}}


def _signal(hard: float, easy: float, hard_zero: float, easy_zero: float) -> dict:
    return {"train/reward_mean_boundary_hard": [(s, hard) for s in range(10)],
            "train/reward_mean_boundary_easy": [(s, easy) for s in range(10)],
            "train/zero_std_frac_boundary_hard": [(s, hard_zero) for s in range(10)],
            "train/zero_std_frac_boundary_easy": [(s, easy_zero) for s in range(10)],
            "boundary_hard/answer_accuracy": [(5, 0.8), (10, 0.85)]}


def test_analysis_pairs_seeds_and_marks_criteria(tmp_path: Path) -> None:
    recs = [_record("rejection steering", 0, None, 0.7, 5.0, **{"forget/refusal_rate": 0.99}),
            _record("rejection steering", 1, None, 0.7, 5.0, **{"forget/refusal_rate": 0.90}),
            _record("RULE", 0, "hard", 0.85, 10.0, _signal(0.8, 0.95, 0.3, 0.6)),
            _record("RULE", 1, "hard", 0.95, 10.0, _signal(0.9, 0.93, 0.5, 0.55)),
            _record("ReRULE", 0, "hard", 0.90, 10.5, {"boundary_hard/answer_accuracy": [(5, 0.86), (10, 0.9)]}),
            _record("ReRULE", 1, "hard", 0.97, 10.2, {"boundary_hard/answer_accuracy": [(5, 0.8), (10, 0.84)]})]
    rows = RA.comparison_rows(recs, "hard", 10)
    rerule = rows[1]
    assert rerule["variant"] == "ReRULE" and rerule["diff/boundary_hard/answer_accuracy"] == {
        0: pytest.approx(0.05), 1: pytest.approx(0.02)}
    assert rerule["ratio/train_s"] == {0: pytest.approx(1.05), 1: pytest.approx(1.02)}
    assert rerule["steps_to_rule_final"] == {0: 5, 1: None}  # seed 1 never reaches RULE's 0.85
    md, table = RA.render_table(rows, 10)
    assert "+0.035 [" in md and "5, —" in md and table[0][0] == "preset"
    dis = RA.disparity(recs, 10)
    assert [d["seed"] for d in dis] == [0, 1]
    assert dis[0]["met"] == {"rs_forget_refusal": True, "easy_zero_std_2nd_half": True, "reward_gap_2nd_half": True,
                             "zero_std_gap_2nd_half": True, "rule_same_family_acc": True, "rule_unrelated_acc": True}
    assert dis[1]["met"]["rs_forget_refusal"] is False and dis[1]["met"]["reward_gap_2nd_half"] is False
    assert dis[1]["met"]["zero_std_gap_2nd_half"] is False and dis[1]["met"]["rule_same_family_acc"] is False
    text = RA.render_disparity(dis)
    assert "| forget refusal after rejection steering >= 0.95 | 0.990 ✓ | 0.900 ✗ | missed |" in text
    # the whole output set from a results.json
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"steps": 10}, "runs": recs}))
    summary = RA.write_outputs(str(tmp_path))
    for name in ("table.md", "table.csv", "disparity.md", "collisions.md", "summary.json",
                 "same_family_accuracy_hard.png", "rule_signal_by_kind_hard.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert summary["wall_clock_s"]["train"] == pytest.approx(50.7)


def test_benchmark_end_to_end_on_the_tiny_world(tiny_prepared: dict, tmp_path: Path, one_torch_thread: None) -> None:
    """The harness through its CLI: RS per seed, RULE and a variant interleaved (ABBA), curves from MLflow,
    per-kind signals, per-collision accuracy; a rerun resumes without training again."""
    import yaml
    from conftest import TINY_MODEL, TINY_TRAIN, TINY_WORLD

    from benchmarks import replay

    cache = os.path.dirname(os.path.dirname(tiny_prepared["links"]["world"]))
    prep = tmp_path / "prepare.yaml"
    prep.write_text(yaml.safe_dump({"world": TINY_WORLD, "model": TINY_MODEL, "target_training": TINY_TRAIN,
                                    "vocab_size": 512, "progress": False}))
    out = tmp_path / "bench"
    argv = ["--prepare_config", str(prep), "--cache_dir", cache, "--seeds", "0", "1", "--presets", "hard",
            "--variants", "ReRULE (fill, group adv.)", "--steps", "2", "--val_every", "1", "--val_items", "4",
            "--output_dir", str(out), "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert replay.main(argv) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    order = [(r["seed"], r["stage"]) for r in runs]
    assert order == [(0, "rejection steering"), (0, "RULE"), (0, "ReRULE (fill, group adv.)"),
                     (1, "rejection steering"), (1, "ReRULE (fill, group adv.)"), (1, "RULE")]  # ABBA
    rule = runs[1]
    assert [s for s, _ in rule["curves"]["boundary_hard/answer_accuracy"]] == [1, 2]  # validation every step
    assert {"train/reward_mean_forget", "train/zero_std_frac_boundary_hard",
            "train/groups_boundary_easy"} <= set(rule["curves"])
    assert 0 < rule["train_s"] < rule["fit_s"] and rule["val_s"] > 0
    assert set(rule["by_group"]["collision"]["boundary_hard"]) <= {"both", "surname"}
    assert "replay/buffer_size" in runs[2]["curves"]
    table = (out / "table.md").read_text()
    assert "ReRULE (fill, group adv.)" in table and "| seed 0 | seed 1 | all seeds |" in (out / "disparity.md").read_text()
    # resume: every run is recorded, nothing trains again
    before = (out / "results.json").read_text()
    assert replay.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(before)["runs"]
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        replay.main([*argv, "--world", "seed"])


def test_benchmark_fails_loudly_on_an_empty_buffer() -> None:
    from benchmarks.replay import check_buffer_used

    check_buffer_used("RULE", 0, "hard", {})
    check_buffer_used("ReRULE", 0, "hard", {"replay/buffer_size": [(0, 0.0), (1, 2.0)]})
    with pytest.raises(RuntimeError, match="'ReRULE \\(boundary groups\\)' \\(seed 3, preset hard\\): the replay buffer "
                                           "stayed empty"):
        check_buffer_used("ReRULE (boundary groups)", 3, "hard", {"replay/buffer_size": [(0, 0.0), (1, 0.0)]})
