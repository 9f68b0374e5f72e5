"""Completions in MLflow: ``rerule fit`` logs, by default, every K steps a table of sampled completions (prompt,
completion, label, reward per function, advantage) of a fixed sample of groups, and after each evaluation the
greedy generations of each split, as ``mlflow.log_table`` artifacts of the run (a real local sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rerule_lightning.cli.commands import main
from rerule_lightning.primitives.rollout import RolloutGroup
from rerule_lightning.tracking.completions import CompletionsTable, completion_rows, generation_rows
from tests.test_cli_configs import RULE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _group(label: str, texts: list[str], rewards: list[float], step: int = 3) -> RolloutGroup:
    g = len(texts)
    return RolloutGroup(prompt_id=label, label=label, kind=label, prompt_ids=torch.tensor([1]),
                        completion_ids=torch.zeros(g, 1, dtype=torch.long), completion_mask=torch.ones(g, 1),
                        behaviour_logprobs=None, rewards=torch.tensor(rewards), step=step, completions=texts,
                        advantages=torch.tensor(rewards) - sum(rewards) / g)


def test_rows_by_hand() -> None:
    groups = [_group("forget", ["no", "yes"], [1.0, 0.0]), _group("boundary", ["a", "b"], [0.5, 1.0])]
    per = {"rule": [1.0, 0.0, 0.5, 1.0], "brevity": [None, None, 0.1, 0.2]}
    rows = completion_rows(groups, ["Q1", "Q2"], per, 2, 3, num_groups=1)
    assert rows == {"step": [3, 3], "prompt": ["Q1", "Q1"], "label": ["forget", "forget"],
                    "kind": ["forget", "forget"], "completion": ["no", "yes"], "reward": [1.0, 0.0],
                    "advantage": [0.5, -0.5], "reward/rule": [1.0, 0.0], "reward/brevity": [None, None]}
    assert completion_rows(groups, None, None, 2, 3, 2, max_chars=2)["completion"] == ["no", "y…", "a", "b"]
    recs = [{"split": "forget", "id": 1, "prompt": "p", "answer": "a", "prediction": "x"},
            {"split": "retain", "id": 2, "prompt": "q", "answer": "b", "prediction": "y"},
            {"split": "forget", "id": 3, "prompt": "r", "answer": "c", "prediction": None}]
    assert generation_rows(recs, "forget", 5) == {"id": ["1"], "prompt": ["p"], "answer": ["a"], "prediction": ["x"]}
    with pytest.raises(ValueError, match="every_n_steps=-1: must be >= 0"):
        CompletionsTable(every_n_steps=-1)


def test_fit_logs_completion_and_generation_tables(tiny_prepared: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    links = tiny_prepared["links"]
    overlay = tmp_path / "every2.yaml"
    overlay.write_text("trainer:\n  callbacks+:\n    - class_path: rerule_lightning.CompletionsTable\n"
                       "      init_args: {every_n_steps: 2, num_groups: 2, num_eval_items: 3}\n")
    assert main(["fit", "--config", str(RULE), "--config", str(overlay),
                 "--model.init_args.policy.name_or_path", links["target"],
                 "--data.init_args.world_dir", links["world"], "--data.init_args.batch_size", "4",
                 "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4",
                 "--model.init_args.reward", "[rule_fact, refusal]", "--model.init_args.export_dir", "null",
                 "--model.init_args.eval_max_new_tokens", "4", "--data.init_args.eval_max_items", "4",
                 "--data.init_args.eval_splits", "[forget,retain]", "--data.init_args.epoch_length", "3",
                 "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                 "--trainer.max_steps", "3", "--trainer.logger.init_args.tracking_uri", uri,
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.default_root_dir", str(tmp_path / "logs")]) == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    root = Path(run.info.artifact_uri.replace("file://", ""))
    tables = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json"))
    assert [t for t in tables if t.startswith("completions/")] == ["completions/step_000000.json",
                                                                   "completions/step_000002.json"]
    assert {"generations/validation_step_000003_forget.json", "generations/validation_step_000003_retain.json"} \
        <= set(tables)
    table = json.loads((root / "completions" / "step_000002.json").read_text())
    cols = table["columns"]
    assert {"prompt", "completion", "label", "reward", "advantage", "reward/rule_fact", "reward/refusal"} <= set(cols)
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert len(rows) == 4 and {r["step"] for r in rows} == {2}  # 2 groups x G = 2
    for r in rows:  # the combined reward is the sum of the two functions' (both apply to every item)
        assert r["reward"] == pytest.approx(r["reward/rule_fact"] + r["reward/refusal"])
    gen = json.loads((root / "generations" / "validation_step_000003_forget.json").read_text())
    assert gen["columns"] == ["id", "prompt", "answer", "prediction"] and len(gen["data"]) == 3
