"""RWKU on a hand-written fixture in the real schema: loading and validation, RL prompts from templates and
intros (exact prompts), boundary prompts about related entities with the original model's greedy answers as
references (recorded in prepare_data, cached), disjointness from the probes, malformed data failing before
training, a 2-step RULE fit and the evaluation suite through the shipped configs, and config instantiation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from datamodules.benchmarks.rwku import (
    RWKUDataModule,
    assert_disjoint,
    drop_probe_collisions,
    intro_blank,
    related_entities,
    render_rwku,
    rl_prompts,
    strip_forget_request,
)
from rerule_lightning.cli.commands import lightning_main, main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "rwku"
CONFIGS = ROOT / "configs"
# the fixture's intros start "Please forget X." as RWKU's do; the datamodule strips that sentence first
INTROS = {r["target"]: strip_forget_request(r["intro"]) for r in map(json.loads, (FIX / "forget_target" / "train.jsonl").read_text().split("\n")[:-1])}


class Tok:
    """A stand-in chat tokenizer (exact strings, no files)."""

    chat_template = "x"

    def apply_chat_template(self, msgs: list, tokenize: bool, add_generation_prompt: bool) -> str:
        return f"<user>{msgs[0]['content']}</user><assistant>"


def _dm(**kw: Any) -> RWKUDataModule:
    args = {"source": str(FIX), "targets": ["Stephen King"], "swaps_per_target": 1, "prompt_format": "raw",
            "batch_size": 2}
    return RWKUDataModule(**{**args, **kw})


# ------------------------------------------------------------------------------------------ loading
def test_fixture_loads_every_config_of_the_real_schema() -> None:
    raw = _dm().load_raw()
    assert sorted(raw) == ["forget_level1", "forget_level2", "forget_level3", "forget_target", "mia_forget",
                           "mia_retain", "neighbor_level1", "neighbor_level2", "train_refusal_llama3", "utility_fluency"]
    assert set(raw["forget_target"][0]) == {"target", "intro"}
    assert set(raw["forget_level3"][0]) == {"subject", "query", "answer", "level", "type"}
    assert [r["target"] for r in raw["forget_target"]] == ["Stephen King", "Confucius", "Bruce Lee", "Dean Koontz"]


def test_target_selection_by_name_or_count() -> None:
    raw = _dm().load_raw()
    assert _dm(targets=2).selected(raw) == ["Stephen King", "Confucius"]
    assert _dm(targets=["Bruce Lee"]).selected(raw) == ["Bruce Lee"]
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['Nobody'\]"):
        _dm(targets=["Nobody"]).load_raw()
    with pytest.raises(ValueError, match="data.targets=9: choose 1..4"):
        _dm(targets=9).load_raw()


# -------------------------------------------------------------------------------- prompt construction
def test_related_entities_rank_by_intro_similarity() -> None:
    assert related_entities("Stephen King", INTROS, [], 2) == ["Dean Koontz", "Bruce Lee"]
    assert related_entities("Stephen King", INTROS, ["Dean Koontz"], 1) == ["Bruce Lee"]


def test_intro_blank_cuts_after_the_first_half() -> None:
    assert intro_blank(INTROS["Stephen King"]) == ("Stephen King is a prolific American author ___.",
                                                   "of horror, suspense and fantasy novels")  # 7 of 13 words


def test_rl_prompts_exact_for_one_target() -> None:
    rows = rl_prompts(["Stephen King"], INTROS, swaps_per_target=1)
    forget = [r for r in rows if r["label"] == "forget"]
    boundary = [r for r in rows if r["label"] == "boundary"]
    assert len(forget) == 25 and len(boundary) == 25  # 12 questions + 12 blanks + 1 intro each
    assert [(r["id"], r["question"], r["kind"], r["target"]) for r in forget[:2]] == [
        ("forget:Stephen King-q0", "Who is Stephen King?", "forget_question", "Stephen King"),
        ("forget:Stephen King-b0", "Stephen King is best described as ___.", "forget_blank", "Stephen King")]
    assert forget[-1]["question"] == "Stephen King is a prolific American author ___."
    assert [(r["question"], r["kind"], r["target"], r["reference"]) for r in boundary[4:6]] == [
        ("Where was Dean Koontz born?", "boundary_swap_question", "Dean Koontz", ""),
        ("Dean Koontz was born in ___.", "boundary_swap_blank", "Dean Koontz", "")]
    assert (boundary[-1]["kind"], boundary[-1]["question"], boundary[-1]["reference"]) == (
        "boundary_intro", "Dean Koontz is an American author ___.", "of suspense thrillers and horror novels")
    extra = rl_prompts(["Stephen King"], INTROS, swaps_per_target=0, boundary_entities=["Stanley Kubrick"])
    assert [r["question"] for r in extra if r["label"] == "boundary"][:2] == ["Who is Stanley Kubrick?",
                                                                             "Stanley Kubrick is best described as ___."]


def test_probe_collisions_are_dropped_and_disjointness_asserted() -> None:
    rows = rl_prompts(["Stephen King"], INTROS, swaps_per_target=0, boundary_entities=["Stanley Kubrick"])
    probe = "Where was  STEPHEN KING born"
    kept = drop_probe_collisions(rows, [probe])
    assert [r["id"] for r in rows if r not in kept] == ["forget:Stephen King-q2"]
    assert_disjoint(kept, [probe])
    with pytest.raises(ValueError, match=r"\['forget:Stephen King-q2'\] are evaluation probes"):
        assert_disjoint(rows, [probe])


def test_rwku_wrappers_in_the_chat_template() -> None:
    q = {"question": "Stephen King was born in ___.", "style": "blank"}
    assert render_rwku(q, chat=True, tokenizer=Tok()) == (
        "<user>Please complete the blank in the following question.\nQuestion: Stephen King was born in ___.\n"
        "</user><assistant>Answer:")
    assert render_rwku({"question": "Who is X?", "style": "question"}, chat=False) == (
        "Please briefly answer the following question.\nQuestion: Who is X?\nAnswer:")
    assert render_rwku({"question": "Q? Sure, the answer is", "style": "affirmative suffix"}, chat=True,
                       tokenizer=Tok()) == ("<user>Please briefly answer the following question.\nQuestion: Q? Sure, "
                                            "the answer is</user><assistant>")
    assert render_rwku({"question": "Write a poem.", "style": "instruction"}, chat=True, tokenizer=Tok()) == \
        "<user>Instruction: Write a poem.\n</user><assistant>"

    class BosTok(Tok):  # a template that writes the bos text itself (Llama 3): dropped, consumers prepend the id
        bos_token = "<bos>"

        def apply_chat_template(self, msgs: list, tokenize: bool, add_generation_prompt: bool) -> str:
            return "<bos>" + super().apply_chat_template(msgs, tokenize, add_generation_prompt)

    assert render_rwku({"question": "Q?", "style": "question"}, chat=True, tokenizer=BosTok()) == (
        "<user>Please briefly answer the following question.\nQuestion: Q?\n</user><assistant>Answer:")


def test_eval_items_are_the_selected_targets_probes() -> None:
    dm = _dm(targets=["Bruce Lee"], swaps_per_target=0)
    items = dm.build_eval_items(dm.load_raw())
    got = {s: [(r["id"], r["answer"]) for r in rows] for s, rows in items.items()}
    assert got == {"forget_level1": [("forget_level1-2", "Jeet Kune Do")],
                   "forget_level2": [("forget_level2-1", "San Francisco")],
                   "forget_level3": [("forget_level3-2", "Enter the Dragon")],
                   "neighbor_level1": [("neighbor_level1-1", "Jackie Chan")],
                   "neighbor_level2": [("neighbor_level2-1", "Wing Chun")],
                   "fluency": [("fluency-1", "")]}
    assert items["forget_level3"][0]["prompt"] == ("Please briefly answer the following question.\nQuestion: Which "
                                                   "film released in 1973 starred the founder of Jeet Kune Do?\nAnswer:")


# ---------------------------------------------------------------------- original-model references
def test_fit_without_reference_model_fails_before_training() -> None:
    dm = _dm()
    with pytest.raises(ValueError, match="data.reference_model is required: 30 boundary prompts"):
        dm.setup("fit")
    dm = _dm()
    dm.setup("test")  # evaluation needs no RL references
    assert not any(r["kind"].startswith("boundary_swap") for r in dm.pool)


def test_greedy_references_recorded_in_prepare_data_and_cached(tiny_chat_model: str, tmp_path: Path,
                                                               one_torch_thread: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rerule_lightning.primitives.generation import greedy_generate

    kw = {"reference_model": tiny_chat_model, "prompt_format": "chat", "cache_dir": str(tmp_path),
          "reference_max_new_tokens": 6}
    dm = _dm(**kw)
    dm.prepare_data()
    files = list((tmp_path / "rwku_reference").glob("*.json"))
    assert len(files) == 1
    dm.setup("fit")
    swapped = [r for r in dm.pool if r["kind"].startswith("boundary_swap")]
    assert len(swapped) == 30  # 24 template swaps + 6 training-side questions about Dean Koontz
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    want = greedy_generate(model, tok, [swapped[0]["prompt"]], 6)[0].split("\n")[0].strip()
    assert swapped[0]["reference"] == want == swapped[0]["value"]
    assert swapped[0]["prompt"].startswith("User: Please briefly answer the following question.\nQuestion: Who is "
                                           "Dean Koontz?\n")
    mtime = files[0].stat().st_mtime_ns
    _dm(**kw).prepare_data()  # same model and prompts: cached, not regenerated
    assert files[0].stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------------- malformed data
def _broken_copy(tmp_path: Path, rel: str, row: int, change: Any) -> Path:
    src = tmp_path / "rwku"
    shutil.copytree(FIX, src)
    path = src / rel
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    change(rows[row])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


MALFORMED = [
    ("missing column", "forget_target/train.jsonl", 2, lambda r: r.pop("intro"),
     "config 'forget_target' split 'train' row 2: field 'intro': missing"),
    ("wrong type", "forget_level2/test.jsonl", 1, lambda r: r.update(answer=42),
     "config 'forget_level2' split 'test' row 1: field 'answer': expected non-empty text, got int"),
    ("empty text", "neighbor_level1/test.jsonl", 0, lambda r: r.update(query=""),
     "config 'neighbor_level1' split 'test' row 0: field 'query': empty text"),
    ("level disagrees with config", "forget_level1/test.jsonl", 1, lambda r: r.update(level="2"),
     "config 'forget_level1' split 'test' row 1: field 'level': '2' in forget_level1 (expected '1')"),
    ("probe about an unknown target", "neighbor_level2/test.jsonl", 1, lambda r: r.update(subject="Jet Li"),
     "config 'neighbor_level2' split 'test' row 1: field 'subject': 'Jet Li' is not a target"),
]


def _mlflow_statuses(db: Path) -> list[str]:
    """Statuses of every run in a sqlite MLflow store (none when the store was never created)."""
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r.info.status for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def _tiny(model: str, source: Path, tmp_path: Path) -> list[str]:
    """Overrides that put the tiny chat model (as policy, prompt tokenizer and original model) and the fixture
    into a shipped config; QLoRA is kept (fast on CPU)."""
    return ["--model.init_args.policy.name_or_path", model, "--model.init_args.policy.tokenizer", model,
            "--model.init_args.policy.dtype", "float32", "--data.init_args.source", str(source),
            "--data.init_args.tokenizer", model, "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "logs")]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_fixture_fails_before_training_through_the_cli(case: tuple, tmp_path: Path, tiny_chat_model: str,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, rel, row, change, expected = case
    src = _broken_copy(tmp_path, rel, row, change)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    rc = main(["fit", "--config", str(CONFIGS / "rwku" / "rule.yaml"), *_tiny(tiny_chat_model, src, tmp_path),
               "--data.init_args.reference_model", tiny_chat_model,
               "--trainer.logger.init_args.tracking_uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"rerule: error: {src} {expected}" in err and str(src / rel) in err
    assert "FINISHED" not in _mlflow_statuses(db)
    assert not (tmp_path / "cache" / "rwku_reference").exists()  # failed before the original model ran


def test_fit_without_reference_model_fails_through_the_cli(tmp_path: Path, tiny_chat_model: str,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["fit", "--config", str(CONFIGS / "rwku" / "rule.yaml"), *_tiny(tiny_chat_model, FIX, tmp_path),
               "--data.init_args.reference_model", "null", "--trainer.logger", "false"])
    assert rc == 2
    assert "data.reference_model is required: 79 boundary prompts" in capsys.readouterr().err  # 3 swaps x 24 + 7 training-side


# ------------------------------------------------------------------------------- CLI: fit, eval, configs
def test_rule_fit_two_steps_through_the_shipped_config(tiny_chat_model: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "export"
    rc = main(["fit", "--config", str(CONFIGS / "rwku" / "rule.yaml"), *_tiny(tiny_chat_model, FIX, tmp_path),
               "--data.init_args.reference_model", tiny_chat_model, "--data.init_args.reference_max_new_tokens", "4",
               "--data.init_args.batch_size", "2", "--model.init_args.num_generations", "2",
               "--model.init_args.max_new_tokens", "8", "--model.init_args.export_dir", str(export),
               "--trainer.max_steps", "2", "--trainer.logger", "false"])
    assert rc == 0
    assert (export / "adapter_config.json").is_file()  # policy.peft stays qlora from the config
    assert len(list((tmp_path / "cache" / "rwku_reference").glob("*.json"))) == 1


def test_eval_suite_produces_every_rwku_metric_key(tiny_chat_model: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "eval.json"
    rc = main(["test", "--config", str(CONFIGS / "rwku" / "eval.yaml"), *_tiny(tiny_chat_model, FIX, tmp_path),
               "--model.init_args.eval_report_path", str(report), "--trainer.logger", "false"])
    assert rc == 0
    metrics = json.loads(report.read_text())["aggregate"]
    assert set(RWKUDataModule().eval_suite.expected_keys()) <= set(metrics)
    for level in ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2"):
        assert metrics[f"rwku/{level}"] == metrics[f"{level}/rouge_l_recall"]
    assert metrics["rwku/fluency"] == metrics["fluency/fluency"]


RWKU_CONFIGS = [[p] for p in sorted((CONFIGS / "rwku").glob("*.yaml")) if p.name != "attack.yaml"]  # attack: test_attack_cli
RWKU_CONFIGS.append([CONFIGS / "rwku" / "rule.yaml", CONFIGS / "replay" / "hard_case.yaml"])


@pytest.mark.parametrize("paths", RWKU_CONFIGS, ids=lambda ps: "+".join(p.relative_to(CONFIGS).as_posix() for p in ps))
def test_every_rwku_config_instantiates_without_loading_weights(paths: list[Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                no_weight_loading: None) -> None:
    monkeypatch.chdir(tmp_path)
    sub = "test" if paths[0].name == "eval.yaml" else "fit"
    cli = lightning_main([sub, *[a for p in paths for a in ("--config", str(p))]], run=False)
    bench = getattr(cli.datamodule, "benchmark", cli.datamodule)
    assert isinstance(bench, RWKUDataModule) and bench.hparams.prompt_format == "chat"
    assert (bench.source, bench.hparams.targets) == ("jinzhuoran/RWKU", 1)
    assert cli.model.policy_cfg.use_chat_template is True
    if len(paths) == 2:
        assert "HardCaseReplayCallback" in {type(c).__name__ for c in cli.trainer.callbacks}
    if sub == "fit":
        assert bench.hparams.reference_model == "meta-llama/Meta-Llama-3-8B-Instruct"
    if sub == "fit" and bench is cli.datamodule:
        assert cli.model.policy_cfg.peft == "qlora" and cli.model.hparams.target_aware is True
        assert cli.trainer.max_steps == 20


def test_qlora_rejection_steering_through_the_shipped_config(tiny_chat_model: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             one_torch_thread: None) -> None:
    """configs/rwku/rs.yaml: 2 QLoRA steps on refusals naming the target, exported as merged weights."""
    monkeypatch.chdir(tmp_path)
    bench = "--data.init_args.benchmark.init_args."
    rs_dir = tmp_path / "rs"
    cli = lightning_main(["fit", "--config", str(CONFIGS / "rwku" / "rs.yaml"),
                          "--model.init_args.policy.name_or_path", tiny_chat_model,
                          "--model.init_args.policy.tokenizer", tiny_chat_model,
                          "--model.init_args.policy.dtype", "float32", "--model.init_args.export_dir", str(rs_dir),
                          "--data.init_args.tokenizer", tiny_chat_model, "--data.init_args.refusal_fraction", "0.5", "--data.init_args.min_refusals", "1",
                          "--data.init_args.batch_size", "2", f"{bench}source", str(FIX),
                          f"{bench}tokenizer", tiny_chat_model, f"{bench}reference_model", tiny_chat_model,
                          f"{bench}reference_max_new_tokens", "4", f"{bench}cache_dir", str(tmp_path / "cache"),
                          "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
                          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                          "--trainer.default_root_dir", str(tmp_path / "logs")])
    assert cli.trainer.global_step == 2 and cli.model.policy_cfg.peft == "qlora"
    refusals = [p for p in cli.datamodule.pairs if p["kind"] == "refusal"]
    target = json.loads((FIX / "forget_target" / "train.jsonl").read_text().splitlines()[0])["target"]
    assert refusals and all(target in p["completion"] for p in refusals)  # refusals name the (first) target
    assert (rs_dir / "model.safetensors").is_file() and (rs_dir / "adapter" / "adapter_config.json").is_file()
