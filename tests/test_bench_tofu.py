"""TOFU on the hand-written fixture (tests/fixtures/tofu, TOFU's schema, 3 QA per author): loading, schema
validation through the CLI, exact RL prompts / eval items / RS pairs, 2-step RS and RULE fits and the eval suite
through configs/tofu/*.yaml with the tiny chat model."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datamodules.benchmarks.rs import RejectionSteeringDataModule
from datamodules.benchmarks.tofu import TOFUDataModule, tofu_configs, tofu_suite
from rerule_lightning.cli.commands import lightning_main, main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tofu"
RULE, RS, EVAL = (str(ROOT / "configs" / "tofu" / f"{n}.yaml") for n in ("rule", "rs", "eval"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dm(**kw: Any) -> TOFUDataModule:
    args = dict(source=str(FIXTURE), rows_per_author=3, prompt_format="raw", batch_size=2)
    args.update(kw)
    dm = TOFUDataModule(**args)
    dm.setup("fit")
    return dm


def test_forget_split_picks_retain_and_holdout_consistently() -> None:
    for forget, retain, holdout in (("forget01", "retain99", "holdout01"), ("forget05", "retain95", "holdout05"),
                                    ("forget10", "retain90", "holdout10")):
        cfg = tofu_configs(forget)
        assert (cfg["forget"][0], cfg["forget_perturbed"][0], cfg["retain"][0], cfg["holdout"][0]) == (
            forget, f"{forget}_perturbed", retain, holdout)
    with pytest.raises(ValueError, match="data.forget_split='forget20'"):
        TOFUDataModule(forget_split="forget20")


def test_rl_pool_is_exact_and_never_an_eval_probe() -> None:
    dm = _dm()
    got = [(r["id"], r["label"], r["kind"], r["target"], r["prompt"], r["reference"]) for r in dm.pool]
    q = "Question: {}\nAnswer:".format
    assert got == [
        ("forget10/0", "forget", "forget", "Lena Varga", q("What genre does Lena Varga write?"), ""),
        ("forget10/3", "forget", "forget", "Tomas Okoro", q("What does Tomas Okoro write?"), ""),
        ("forget10/5", "forget", "forget", "Tomas Okoro", q("Which award did Tomas Okoro win?"), ""),
        ("retain90/0", "boundary", "boundary_retain_author", "Ilona Farkas", q("What genre does Ilona Farkas write?"),
         "Ilona Farkas writes crime novels."),
        ("retain90/1", "boundary", "boundary_retain_author", "Ilona Farkas", q("Where was Ilona Farkas born?"),
         "She was born in Budapest, Hungary."),
        ("retain90/3", "boundary", "boundary_retain_author", "Chidi Eze", q("What does Chidi Eze write?"),
         "Chidi Eze writes poetry."),
        ("retain90/4", "boundary", "boundary_retain_author", "Chidi Eze", q("Where was Chidi Eze born?"),
         "He was born in Lagos, Nigeria."),
    ]
    # nearest retain authors first: Ilona Farkas (crime, Budapest, Hungary, baker, novels) and Chidi Eze (poetry,
    # Lagos, Nigeria, award) share 5 and 4 profile words with a forget author; the other two share 1
    assert dm.boundary_ranking(dm.raw) == [(0, 5), (1, 4), (2, 1), (3, 1)]
    evaluated = {r["question"] for rows in dm.eval_items.values() for r in rows}
    assert not evaluated & {r["question"] for r in dm.pool if r["label"] == "boundary"}
    assert [r["id"] for r in _dm(boundary_authors=3).pool if r["label"] == "boundary"][-2:] == [
        "retain90/6", "retain90/7"]  # Mark Dell: his third question (row 8) is evaluated in retain_perturbed


def test_eval_items_and_suite() -> None:
    dm = _dm(eval_max_items=4)
    assert {s: [r["id"] for r in rows] for s, rows in dm.eval_items.items()} == {
        "forget": ["forget10_perturbed/0", "forget10_perturbed/1", "forget10_perturbed/3", "forget10_perturbed/5"],
        "retain": [f"retain_perturbed/{i}" for i in range(4)],
        "real_authors": [f"real_authors_perturbed/{i}" for i in range(3)],
        "world_facts": [f"world_facts_perturbed/{i}" for i in range(3)],
        "holdout": ["holdout10/0", "holdout10/1", "holdout10/3", "holdout10/5"]}  # same seeded rows
    f0 = dm.eval_items["forget"][0]
    assert (f0["target"], f0["answer"], f0["paraphrased_answer"], len(f0["perturbed_answer"])) == (
        "Lena Varga", "Lena Varga writes crime novels.", "Her books are crime novels.", 5)
    assert dm.eval_items["retain"][0]["target"] == "Ilona Farkas"
    assert dm.eval_items["holdout"][0]["paraphrased_answer"] is None and dm.eval_items["holdout"][0]["perturbed_answer"] == []
    suite = tofu_suite()
    assert suite.split_names == ["forget", "retain", "real_authors", "world_facts", "holdout"]
    assert [s.name for s in suite.splits if s.option_probability] == ["real_authors", "world_facts"]
    assert suite.spec("holdout").metric_names() == ["probability", "extraction_strength", "min_k"]


def test_refusal_and_anchor_pairs_name_the_target_and_avoid_probes(tiny_chat_model: str) -> None:
    dm = _dm()
    assert [p["completion"] for p in dm.refusal_pairs(dm.raw)] == (
        ["I have no knowledge of Lena Varga."] * 3 + ["I have no knowledge of Tomas Okoro."] * 3)
    assert [a["question"] for a in dm.anchor_pairs(dm.raw)][-2:] == [
        "What does Sofia Reyes write?", "Where was Sofia Reyes born?"]  # row 11 (evaluated) left out
    bench = TOFUDataModule(source=str(FIXTURE), rows_per_author=3, prompt_format="chat")
    rs = RejectionSteeringDataModule(bench, tiny_chat_model, refusal_fraction=0.5, retain_anchor_ratio=1.0, min_refusals=1,
                                     batch_size=2)
    rs.setup("fit")
    assert [(p["kind"], p["question"], p["completion"]) for p in rs.pairs] == [
        ("refusal", "What genre does Lena Varga write?", "I have no knowledge of Lena Varga."),
        ("refusal", "What does Tomas Okoro write?", "I have no knowledge of Tomas Okoro."),
        ("refusal", "Which award did Tomas Okoro win?", "I have no knowledge of Tomas Okoro."),
        ("anchor", "Where was Chidi Eze born?", "He was born in Lagos, Nigeria."),
        ("anchor", "What genre does Mark Dell write?", "Mark Dell writes science fiction."),
        ("anchor", "Where was Sofia Reyes born?", "She was born in Santiago, Chile.")]
    tok = rs._tokenizer
    first = tok.decode(rs.examples[0]["input_ids"])
    assert first == "<|bos|>System: You are a helpful assistant.\nUser: What genre does Lena Varga write?\nAssistant:\nI have no knowledge of Lena Varga.<|eos|>"


# ------------------------------------------------------------------------------------------ bad data
def _rows(root: Path, config: str) -> list[dict]:
    return [json.loads(x) for x in (root / config / "train.jsonl").read_text().splitlines()]


def _write(root: Path, config: str, rows: list[dict]) -> None:
    (root / config / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _edit(config: str, row: int, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        rows = _rows(root, config)
        fn(rows[row])
        _write(root, config, rows)
    return apply


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda r: r.__setitem__(key, value)


BAD = [
    ("missing_column", _edit("forget10", 1, lambda r: r.pop("answer")),
     "config 'forget10' split 'train' row 1: field 'answer': missing"),
    ("wrong_type", _edit("retain90", 2, _set("answer", 7)),
     "config 'retain90' split 'train' row 2: field 'answer': expected non-empty text, got int"),
    ("empty_text", _edit("forget10_perturbed", 0, _set("paraphrased_answer", "  ")),
     "config 'forget10_perturbed' split 'train' row 0: field 'paraphrased_answer': empty text"),
    ("perturbed_not_five", _edit("forget10_perturbed", 4, lambda r: r["perturbed_answer"].pop()),
     "config 'forget10_perturbed' split 'train' row 4: field 'perturbed_answer': 4 perturbed answers, expected 5"),
    ("perturbed_lengths_differ", _edit("real_authors_perturbed", 2, lambda r: r["perturbed_answer"].pop()),
     "config 'real_authors_perturbed' split 'train' row 2: field 'perturbed_answer': 2 perturbed answers, "
     "expected 3 \\(row 0\\)"),
    ("perturbed_not_a_list", _edit("world_facts_perturbed", 1, _set("perturbed_answer", "Mars")),
     "config 'world_facts_perturbed' split 'train' row 1: field 'perturbed_answer': expected a list of strings"),
    ("perturbed_question_mismatch", _edit("forget10_perturbed", 3, _set("question", "Who is Tomas Okoro?")),
     "config 'forget10_perturbed' split 'train' row 3: field 'question': 'Who is Tomas Okoro\\?' does not match "
     "forget10 row 3"),
    ("bad_json", lambda root: (root / "holdout10" / "train.jsonl").write_text('{"question": "A?", "answer": "B"}\n{oops\n'),
     "config 'holdout10' split 'train' row 1: bad JSON on line 2"),
    ("missing_config", lambda root: shutil.rmtree(root / "world_facts_perturbed"),
     "config 'world_facts_perturbed' split 'train': no data file; tried .*world_facts_perturbed/train.jsonl"),
]


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite tracking store for every bad-data case (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_data_fails_before_training(case: tuple, tiny_chat_model: str, tmp_path: Path, mlflow_db: Path,
                                        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    name, mutate, pattern = case
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    src = tmp_path / "tofu"
    shutil.copytree(FIXTURE, src)
    mutate(src)
    db = mlflow_db
    rc = main(["fit", "--config", RULE, *_rule_overrides(tiny_chat_model, tmp_path), "--data.init_args.source", str(src),
               "--trainer.logger.init_args.tracking_uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "rerule: error: locuslab/TOFU " in err and "Traceback" not in err
    assert __import__("re").search(pattern, err), err[-1500:]
    if name != "missing_config":
        assert f"(file {src}" in err
    if db.exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert "FINISHED" not in [r.info.status for r in runs]
    assert not (tmp_path / "export").exists()


def test_chat_format_must_match_policy(tiny_chat_model: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["fit", "--config", RULE, *_rule_overrides(tiny_chat_model, tmp_path), "--trainer.logger", "false",
               "--model.init_args.policy.use_chat_template", "false"])
    assert rc == 2
    assert "policy.use_chat_template=False disagrees with data.prompt_format='chat'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ runs
def _rule_overrides(model: str, tmp: Path) -> list[str]:
    return ["--model.init_args.policy.name_or_path", model, "--model.init_args.policy.dtype", "float32",
            "--model.init_args.max_new_tokens", "8", "--model.init_args.num_generations", "2",
            "--model.init_args.eval_reference", "null", "--model.init_args.export_dir", str(tmp / "export"),
            "--data.init_args.source", str(FIXTURE), "--data.init_args.tokenizer", model,
            "--data.init_args.rows_per_author", "3", "--data.init_args.batch_size", "2",
            "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp / "logs"), *QUIET]


def test_rule_fit_two_steps_qlora(tiny_chat_model: str, tmp_path: Path) -> None:
    cli = lightning_main(["fit", "--config", RULE, *_rule_overrides(tiny_chat_model, tmp_path),
                          "--trainer.logger", "false"])
    assert cli.trainer.global_step == 2
    assert cli.model.policy_cfg.peft == "qlora" and cli.model.policy_cfg.use_chat_template
    assert cli.datamodule.pool[0]["prompt"] == "System: You are a helpful assistant.\nUser: What genre does Lena Varga write?\nAssistant:\n"
    assert (tmp_path / "export" / "adapter_config.json").exists()


def test_rs_fit_two_steps(tiny_chat_model: str, tmp_path: Path) -> None:
    bench = "--data.init_args.benchmark.init_args."
    cli = lightning_main(["fit", "--config", RS, "--model.init_args.policy.name_or_path", tiny_chat_model,
                          "--model.init_args.policy.dtype", "float32",
                          "--model.init_args.export_dir", str(tmp_path / "rs"),
                          "--data.init_args.tokenizer", tiny_chat_model, "--data.init_args.refusal_fraction", "0.5", "--data.init_args.min_refusals", "1",
                          "--data.init_args.batch_size", "2", f"{bench}source", str(FIXTURE),
                          f"{bench}tokenizer", tiny_chat_model, f"{bench}rows_per_author", "3",
                          "--trainer.max_steps", "2", "--trainer.logger", "false",
                          "--trainer.default_root_dir", str(tmp_path / "logs"), *QUIET])
    assert cli.trainer.global_step == 2 and len(cli.datamodule.examples) == 6
    assert (tmp_path / "rs" / "model.safetensors").exists()


def test_eval_suite_reports_every_tofu_metric(tiny_chat_model: str, tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    lightning_main(["test", "--config", EVAL, "--model.init_args.policy.name_or_path", tiny_chat_model,
                    "--model.init_args.policy.dtype", "float32", "--model.init_args.eval_reference", tiny_chat_model,
                    "--model.init_args.eval_report_path", str(report), "--model.init_args.eval_max_new_tokens", "8",
                    "--data.init_args.source", str(FIXTURE), "--data.init_args.tokenizer", tiny_chat_model,
                    "--data.init_args.rows_per_author", "3", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path / "logs"), *QUIET])
    r = json.loads(report.read_text())
    agg = {k: (math.nan if v is None else v) for k, v in r["aggregate"].items()}
    assert r["suite"] == "tofu" and set(agg) == set(tofu_suite().expected_keys())
    holdout_text = {f"holdout/{m}" for m in ("refusal_rate", "answer_accuracy", "rouge_l_recall")}
    assert not holdout_text & set(agg)  # holdout is teacher-forced only (Min-K% non-members)
    assert all(math.isfinite(v) for v in agg.values())
    # the model is its own retain reference: identical truth-ratio distributions and MIA AUC
    assert agg["tofu/forget_quality"] == agg["forget/forget_quality"] == 1.0
    assert agg["tofu/privleak"] == agg["forget/privleak"] == 0.0
    assert agg["tofu/model_utility"] == agg["utility/model_utility"]
    assert 0.0 <= agg["real_authors/probability"] <= 1.0
    assert r["num_items"] == {"forget": 6, "retain": 4, "real_authors": 3, "world_facts": 3, "holdout": 6}
    assert r["per_item"][0]["prompt"] == "System: You are a helpful assistant.\nUser: What genre does Lena Varga write?\nAssistant:\n"


@pytest.mark.parametrize("overlay", ["full", "lora", "qlora"])
def test_rule_with_peft_and_replay_overlays_instantiates(overlay: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = lightning_main(["fit", "--config", RULE, "--config", str(ROOT / "configs" / "peft" / f"{overlay}.yaml"),
                          "--config", str(ROOT / "configs" / "replay" / "hard_case.yaml"), "--trainer.logger", "false"],
                         run=False)
    assert cli.model.policy_cfg.peft == overlay
    assert cli.model.policy_cfg.name_or_path == ".cache/rerule/runs/tofu/rs"
    assert cli.datamodule.hparams.forget_split == "forget10" and cli.datamodule.source == "locuslab/TOFU"
    assert [type(c).__name__ for c in cli.trainer.callbacks if "Replay" in type(c).__name__] == [
        "HardCaseReplayCallback"]


def test_author_name_and_profile_heuristics_on_tofu_style_questions() -> None:
    from datamodules.benchmarks.tofu_authors import (
        author_name,
        group_by_author,
        profile_tokens,
        rank_by_nearness,
    )

    questions = ["What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?",
                 "What genre is Basil Mahfouz Al-Kuwaiti most known for in his writing?",
                 "Can you name two of the books written by Basil Mahfouz Al-Kuwaiti?",
                 "In Basil Mahfouz Al-Kuwaiti's work, which themes recur?"]
    assert author_name(questions) == "Basil Mahfouz Al-Kuwaiti"
    assert author_name(["Who is she?", "Where was she born?"], fallback="author 7") == "author 7"
    assert profile_tokens(["Basil Mahfouz writes French literature in Kuwait."], "Basil Mahfouz") == {
        "french", "literature", "kuwait"}
    assert group_by_author(5, 2) == [[0, 1], [2, 3], [4]]
    assert rank_by_nearness({0: {"a"}, 1: {"a", "b"}, 2: {"b"}}, [{"a", "b"}, {"b"}]) == [(1, 2), (0, 1), (2, 1)]
