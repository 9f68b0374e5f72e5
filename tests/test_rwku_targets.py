"""``benchmarks/rwku_targets.py``: RULE's RWKU protocol, one target at a time from the original model, through the
shipped rs / rule / eval configs, with the per-target metrics and their mean in one table (two fixture targets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "rwku"
sys.path.insert(0, str(ROOT / "benchmarks"))

import rwku_targets  # noqa: E402


def test_targets_resolve_by_name_number_and_range() -> None:
    names = ["Stephen King", "Confucius", "Bruce Lee", "Dean Koontz"]
    assert rwku_targets.resolve_targets(["1-2", "Dean Koontz", "1"], names) == ["Stephen King", "Confucius",
                                                                                 "Dean Koontz"]
    with pytest.raises(ValueError, match="rows 1..4 exist"):
        rwku_targets.resolve_targets(["3-5"], names)
    with pytest.raises(ValueError, match="'Nobody': not a forget_target name"):
        rwku_targets.resolve_targets(["Nobody"], names)


def test_table_has_a_row_per_target_and_their_mean() -> None:
    rows = {"A": dict.fromkeys(rwku_targets.COLUMNS, 0.5), "B": dict.fromkeys(rwku_targets.COLUMNS, 0.25)}
    md, data = rwku_targets.table(rows)
    assert data["mean"] == dict.fromkeys(rwku_targets.COLUMNS, 0.375)
    assert md.splitlines()[-1] == "| **mean** | 37.5 | 37.5 | 37.5 | 37.5 | 37.5 | 0.38 |"


def test_two_targets_one_at_a_time_from_the_original_model(tiny_chat_model: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            one_torch_thread: None) -> None:
    monkeypatch.chdir(ROOT)  # the configs are addressed relative to the repository, as in the script's usage
    m, out = tiny_chat_model, tmp_path / "out"
    common = (f"--model.init_args.policy.name_or_path {m} --model.init_args.policy.tokenizer {m} "
              f"--model.init_args.policy.dtype float32 --trainer.accelerator cpu --trainer.logger false "
              "--trainer.enable_progress_bar false --trainer.enable_model_summary false")
    bench = "--data.init_args.benchmark.init_args."
    rs = (f"{common} --data.init_args.tokenizer {m} --data.init_args.min_refusals 1 --data.init_args.batch_size 2 "
          f"{bench}source {FIX} {bench}tokenizer {m} {bench}reference_model {m} {bench}reference_max_new_tokens 4 "
          f"{bench}cache_dir {tmp_path / 'cache'} --trainer.max_steps 1")
    data = (f"--data.init_args.source {FIX} --data.init_args.tokenizer {m} --data.init_args.cache_dir "
            f"{tmp_path / 'cache'}")
    rule = (f"{common.replace(f'--model.init_args.policy.name_or_path {m} ', '')} {data} "
            f"--data.init_args.reference_model {m} --data.init_args.reference_max_new_tokens 4 "
            "--data.init_args.batch_size 2 --model.init_args.num_generations 2 --model.init_args.max_new_tokens 4 "
            "--trainer.max_steps 1")
    ev = f"{common.replace(f'--model.init_args.policy.name_or_path {m} ', '')} {data} --data.init_args.eval_max_items 2"
    rc = rwku_targets.main(["--targets", "1", "Bruce Lee", "--source", str(FIX), "--out", str(out),
                            "--rs-args", rs, "--rule-args", rule, "--eval-args", ev])
    assert rc == 0
    for t in ("Stephen_King", "Bruce_Lee"):
        assert (out / t / "rs" / "model.safetensors").is_file()  # each target steered from the original model
        assert (out / t / "rule" / "adapter_config.json").is_file()
        report = json.loads((out / t / "eval.json").read_text())
        assert {r["target"] for r in report["per_item"]} == {t.replace("_", " ")}  # the target's own probes
    data_out = json.loads((out / "table.json").read_text())
    assert list(data_out["targets"]) == ["Stephen King", "Bruce Lee"]
    for c in rwku_targets.COLUMNS:
        vals = [data_out["targets"][t][c] for t in data_out["targets"]]
        assert data_out["mean"][c] == pytest.approx(sum(vals) / 2, abs=1e-12)
    assert (out / "table.md").read_text().count("\n| ") == 3  # header rows aside: two targets and the mean
