"""benchmarks/baselines.py without training: the grid-selection rule, the cache-dir guard and the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import baselines as bb


def _val(forget: float, same_family: float) -> dict[str, float]:
    return {"forget/answer_accuracy": forget, "boundary_hard/answer_accuracy": same_family}


def test_selection_score_is_the_harmonic_mean_of_removal_and_same_family_accuracy() -> None:
    assert bb.selection_score(_val(1.0, 1.0)) == 0.0  # the untouched target removed nothing
    assert bb.selection_score(_val(0.0, 0.0)) == 0.0  # a collapsed model kept nothing
    assert bb.selection_score(_val(0.5, 0.5)) == pytest.approx(0.5)
    assert bb.selection_score(_val(0.2, 0.6)) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    points = [{"lr": 1, "val": _val(1.0, 1.0)}, {"lr": 2, "val": _val(0.2, 0.6)}, {"lr": 3, "val": _val(0.0, 0.1)},
              {"lr": 4, "val": _val(0.2, 0.6)}]
    assert bb.choose(points)["lr"] == 2  # ties: the first in grid order


def test_the_validation_world_never_shares_the_evaluated_cache(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bb.parse_args(["--cache_dir", str(tmp_path), "--val_cache_dir", str(tmp_path)])
    args = bb.parse_args(["--cache_dir", str(tmp_path / "c")])
    assert args.val_cache_dir == str(tmp_path / "c") + "-val" and args.lrs is None


def test_tables_from_results(tmp_path: Path) -> None:
    final = {k: 0.5 for _, k in bb.COLUMNS}
    runs = [{"kind": "select", "method": "NPO", "lr": 1e-4, "epochs": 2, "val": _val(0.2, 0.6), "fit_s": 3.0}]
    runs += [{"kind": "final", "method": "NPO", "seed": s, "lr": 1e-4, "epochs": 2, "final": {**final,
              "forget/answer_accuracy": v}, "fit_s": 2.0, "forget_share": 1.0, "retain_share": 0.0} for s, v in
             ((0, 0.25), (1, 0.75))]
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"cache_dir": str(tmp_path / "none"),
                                                                    "rule_steps": 60}, "runs": runs}))
    bb.write_outputs(str(tmp_path))
    table = (tmp_path / "table.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| NPO "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["NPO", "2", "lr 0.0001, 2 ep", "0.500 ± 0.354"]  # mean and sample std of 0.25, 0.75
    assert cells[-3:] == ["1.000 ± 0.000", "0.000 ± 0.000", "2.000 ± 0.000"]
    selection = (tmp_path / "selection.md").read_text()
    assert "| NPO | 0.0001 | 2 | 0.200 | 0.600 |" in selection and "| 0.686 | ✓ |" in selection
