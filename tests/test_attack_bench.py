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


def _frontier_results(d: Path, seed_points: dict, reports: list[tuple[str, int, int]]) -> None:
    """A hand-made benchmarks/frontier.py results.json: runs with points (forget acc, same-family, retain), reports
    at ``(key, seed, at)`` with a kept model directory."""
    runs: list[dict] = [{"stage": "rejection steering", "seed": 0}, {"stage": "rejection steering", "seed": 7}]
    for (method, seed), pts in seed_points.items():
        key = f"{method}|learning_rate=0.0001|60"
        runs.append({"kind": "run", "key": key, "seed": seed, "method": method, "family": "rl", "knobs": {},
                     "points": [{"step": at, "epoch": 1, "sequences": 8.0 * at, "train_s": 1.0,
                                 "select": {"forget/answer_accuracy": acc, "boundary_hard/answer_accuracy": fam,
                                            "retain/answer_accuracy": ret}} for at, acc, fam, ret in pts]})
    for key, seed, at in reports:
        model = d / f"seed{seed}" / "chosen" / f"m{at}"
        model.mkdir(parents=True)
        runs.append({"kind": "report", "key": key, "seed": seed, "at": at, "model_dir": str(model)})
    (d / "results.json").write_text(json.dumps({"runs": runs}))


def test_models_from_frontier_take_the_point_chosen_under_the_constraint(tmp_path: Path, capsys) -> None:
    # RULE seed 0: step 10 meets acc ≤ 0.05 with same-family 0.6, step 20 meets it with 0.7 but retain 0.8 (a
    # collapsed point), step 30 is above 0.05: step 10 is chosen. NPO seed 0 never reaches 0.05: left out.
    _frontier_results(tmp_path, {("RULE", 0): [(10, 0.04, 0.6, 0.95), (20, 0.0, 0.7, 0.8), (30, 0.2, 0.9, 0.99)],
                                 ("NPO", 0): [(5, 0.3, 0.9, 0.99)],
                                 ("random replay", 0): [(10, 0.0, 0.9, 0.99)]},  # not a method the table attacks
                      [("RULE|learning_rate=0.0001|60", 0, 10)])
    got = robustness.models_from_frontier([str(tmp_path)], [0], "forget acc ≤ 0.05")
    assert got == [("RS", 0, f"{tmp_path}/seed0/rs"), ("RULE", 0, f"{tmp_path}/seed0/chosen/m10")]
    assert "NPO seed 0: forget acc ≤ 0.05 not reached" in capsys.readouterr().err


def test_models_from_frontier_errors_name_what_is_missing(tmp_path: Path) -> None:
    _frontier_results(tmp_path, {("RULE", 0): [(10, 0.0, 0.6, 0.95)]}, [])
    with pytest.raises(SystemExit, match=r"results.json: RULE seed 0 at 10: the chosen model was not kept "
                                         r"\(run benchmarks/frontier.py with --keep_models\)"):
        robustness.models_from_frontier([str(tmp_path)], [0], "forget acc ≤ 0.05")
    with pytest.raises(SystemExit, match=r"--constraint 'acc < 1': choose one of \['refusal ≥ 0.95'"):
        robustness.models_from_frontier([str(tmp_path)], [0], "acc < 1")
    with pytest.raises(SystemExit, match=r"--frontier_from '.*nowhere': no results.json there"):
        robustness.models_from_frontier([str(tmp_path / "nowhere")], [0], "forget acc ≤ 0.05")


def _attack_results(d: Path, recs: list[tuple[str, int, float]]) -> str:
    d.mkdir(parents=True)
    runs = [{"method": m, "seed": s, "headline": {"greedy forget accuracy": a, "8bit Δ": a / 2}} for m, s, a in recs]
    (d / "results.json").write_text(json.dumps({"settings": {}, "runs": runs}))
    return str(d)


def test_analyse_only_merges_two_processes_and_refuses_a_model_twice(tmp_path: Path) -> None:
    # seeds 0 and 1 attacked by one process, seed 2 by another: the merged table has every seed of each method
    a = _attack_results(tmp_path / "a", [("RULE", 0, 0.0), ("RULE", 1, 0.1)])
    b = _attack_results(tmp_path / "b", [("RULE", 2, 0.2), ("NPO", 2, 0.5)])
    out = tmp_path / "ab"
    assert robustness.main(["--analyse_only", "--inputs", a, b, "--output_dir", str(out)]) == 0
    assert [(r["method"], r["seed"]) for r in json.loads((out / "results.json").read_text())["runs"]] == [
        ("RULE", 0), ("RULE", 1), ("RULE", 2), ("NPO", 2)]
    md = (out / "robustness.md").read_text()
    assert "| RULE | 3 | 0.100 [" in md and "| NPO | 1 | 0.500 | +0.250 |" in md  # mean of 0, 0.1, 0.2; one seed
    c = _attack_results(tmp_path / "c", [("NPO", 2, 0.4)])
    with pytest.raises(SystemExit, match=r"c/results.json: NPO seed 2 is also in .*b/results.json"):
        robustness.main(["--analyse_only", "--inputs", a, b, c, "--output_dir", str(tmp_path / "abc")])
    assert not (tmp_path / "abc").exists()
    with pytest.raises(SystemExit):
        robustness.main(["--inputs", a, "--output_dir", str(tmp_path / "x")])  # only with --analyse_only
