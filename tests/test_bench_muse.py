"""MUSE-Books and MUSE-News on hand-written fixtures in the real schema: loading and validation, RL prompt
construction (exact prompts and references), probe exclusion, malformed data failing before training, a
2-step RULE fit and the evaluation suite through the shipped configs, and config instantiation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from datamodules.benchmarks.muse import (
    MUSEDataModule,
    completion_prompts,
    cut_windows,
    muse_probes,
    render_muse,
)
from rerule_lightning.cli.commands import lightning_main, main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
CONFIGS = ROOT / "configs"
SMALL = {"prefix_words": 8, "continuation_words": 6}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _dm(corpus: str = "books", **kw: Any) -> MUSEDataModule:
    return MUSEDataModule(corpus=corpus, source=str(FIX / f"muse_{corpus}"), batch_size=2, **{**SMALL, **kw})


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("corpus", ["books", "news"])
def test_fixture_loads_every_config_and_split_of_the_real_schema(corpus: str) -> None:
    raw = _dm(corpus).load_raw()
    assert sorted(raw) == ["knowmem/forget_qa", "knowmem/forget_qa_icl", "knowmem/retain_qa", "knowmem/retain_qa_icl",
                           "privleak/forget", "privleak/holdout", "privleak/retain", "raw/forget", "raw/holdout",
                           "raw/retain1", "raw/retain2", "verbmem/forget"]
    assert set(raw["verbmem/forget"][0]) == {"prompt", "gt"}
    assert set(raw["knowmem/forget_qa"][0]) == {"question", "answer"}
    assert all(set(r) == {"text"} for k in ("raw/forget", "privleak/holdout") for r in raw[k])


def test_corpus_picks_hub_id_and_suite() -> None:
    books, news = MUSEDataModule(corpus="books"), MUSEDataModule(corpus="news")
    assert (books.source, books.eval_suite.name, books.target_name) == ("muse-bench/MUSE-Books", "muse_books",
                                                                        "Harry Potter")
    assert (news.source, news.eval_suite.name, news.target_name) == ("muse-bench/MUSE-News", "muse_news", "BBC News")
    with pytest.raises(ValueError, match="data.corpus='poems'"):
        MUSEDataModule(corpus="poems")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- prompt construction
def test_windows_tile_each_document_verbatim() -> None:
    text = "One two  three four,\nfive six seven eight nine ten eleven"
    assert cut_windows([text], 3, 2) == [
        {"doc": 0, "start": 0, "prefix": "One two  three", "continuation": "four,\nfive"},
        {"doc": 0, "start": 5, "prefix": "six seven eight", "continuation": "nine ten"},
    ]


def test_rl_pool_books_exact_prompts_and_references() -> None:
    dm = _dm()
    dm.setup("fit")
    got = [(r["id"], r["label"], r["kind"], r["prompt"], r["reference"]) for r in dm.pool]
    assert got == [
        ("forget-0-42", "forget", "forget", "swore it belonged to the old headmaster, who", ""),
        ("forget-1-42", "forget", "forget", "the brass key, and the frozen surface sang", ""),
        ("retain1-0-0", "boundary", "boundary_retain_text", "The village of Eddleford kept its clocks ten",
         "minutes fast, a habit that began"),
        ("retain1-0-14", "boundary", "boundary_retain_text", "when the baker Morwen Tate insisted that bread",
         "should never be late. Travellers who"),
        ("retain1-0-28", "boundary", "boundary_retain_text", "missed the evening coach blamed the clocks, but",
         "the villagers only shrugged and offered"),
        ("retain1-1-0", "boundary", "boundary_retain_text", "Captain Aldous Fenn charted the northern islands in",
         "a leaking sloop called the Marigold."),
        ("retain1-1-14", "boundary", "boundary_retain_text", "He named each island after a member of",
         "his crew, and the smallest, a"),
        ("retain1-1-28", "boundary", "boundary_retain_text", "rock with a single pine tree, he named",
         "after the ship's cat, a grey"),
    ]
    assert {r["target"] for r in dm.pool} == {"Harry Potter"}


def test_rl_pool_news_exact_prompts_and_references() -> None:
    dm = _dm("news")
    dm.setup("fit")
    forget = [(r["id"], r["prompt"]) for r in dm.pool if r["label"] == "forget"]
    assert forget == [("forget-0-28", "homes had been evacuated overnight. Residents told reporters"),
                      ("forget-2-28", "98 points. She said the squad would need")]
    first = next(r for r in dm.pool if r["label"] == "boundary")
    assert (first["id"], first["prompt"], first["reference"]) == (
        "retain1-0-0", "A rare copy of a seventeenth-century atlas has", "sold for 1.2 million pounds at")


def test_windows_overlapping_verbmem_or_knowmem_are_never_rl_prompts() -> None:
    dm = _dm()
    raw = dm.load_raw()
    forget = [r["text"] for r in raw["raw/forget"]]
    assert len(cut_windows(forget, 8, 6)) == 8  # 4 per document before exclusion
    probes = muse_probes(raw["verbmem/forget"], raw["knowmem/forget_qa"])
    assert probes[0] == raw["verbmem/forget"][0]["prompt"] + " " + raw["verbmem/forget"][0]["gt"]
    kept = completion_prompts(forget, label="forget", source="forget", num_prompts=99, seed=0, probes=probes,
                              overlap_ngram=8, target="T", **SMALL)
    # windows 0, 14 and 28 of each document lie inside the VerbMem prompt + gt (window 0-14 straddles the two)
    assert [r["id"] for r in kept] == ["forget-0-42", "forget-1-42"]
    # a KnowMem question (shorter than the n-gram) inside a window excludes it too
    knowmem_hit = completion_prompts(["Who is Wren Halloway's friend? Nobody knows that at all"], label="forget",
                                     source="x", num_prompts=9, seed=0, probes=probes, overlap_ngram=8, target="T",
                                     prefix_words=5, continuation_words=2)
    assert knowmem_hit == []


def test_seeded_draw_is_deterministic_and_in_document_order() -> None:
    dm = _dm(num_boundary_prompts=3, seed=5)
    dm.setup("fit")
    ids = [r["id"] for r in dm.pool if r["label"] == "boundary"]
    again = _dm(num_boundary_prompts=3, seed=5)
    again.setup("fit")
    assert ids == [r["id"] for r in again.pool if r["label"] == "boundary"]
    assert len(ids) == 3 and ids == sorted(ids, key=lambda i: (int(i.split("-")[1]), int(i.split("-")[2])))


def test_eval_items_use_muse_formats() -> None:
    dm = _dm()
    dm.setup("test")
    items = dm.eval_items
    assert [len(items[s]) for s in dm.eval_splits] == [2, 3, 4, 2, 2]  # retain_qa rows 2-3 repeat retain_qa_icl row 0 (kept, as MUSE does)
    vm = items["verbmem_forget"][0]
    assert vm["prompt"] == "Wren Halloway found the brass key under the loose stone of the east tower on the first " \
                           "night of winter term."
    assert vm["answer"] == "The key was warm to the touch and hummed faintly whenever she walked past the library doors."
    assert items["knowmem_forget"][0]["prompt"] == (
        "Question: What is the name of the school in the story?\nAnswer: Thornbury Academy\n\n"
        "Question: Which professor gathered the students on the shore?\nAnswer: Professor Ilsa Crane\n\n"
        "Question: Where did Wren Halloway find the brass key?\nAnswer: ")
    assert items["knowmem_retain"][1]["prompt"] == (
        "Question: Who kept a ledger of every ship that passed?\nAnswer: Saoirse Dunne\n\n"
        "Question: When did the keeper paint the tower?\nAnswer: Every spring\n\n"
        "Question: What did Saoirse Dunne write beside each ship's name?\nAnswer: ")
    assert items["knowmem_retain"][1]["answer"] == "A short poem"
    assert [(r["prompt"], r["answer"]) for r in items["privleak_holdout"]] == [
        ("", "Beneath the market square of Callowmere ran a river that nobody had seen for a century."),
        ("", "The children of the town claimed they could hear it on quiet nights.")]
    one_shot = _dm(icl_shots=1)
    one_shot.setup("test")
    assert one_shot.eval_items["knowmem_forget"][0]["prompt"].count("Question:") == 2


def test_chat_format_wraps_every_prompt_as_the_user_message() -> None:
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, msgs: list, tokenize: bool, add_generation_prompt: bool) -> str:
            return f"<u>{msgs[0]['content']}</u><a>"

    row = {"question": "a text prefix", "style": "completion", "few_shot": [["q", "a"]]}
    assert render_muse(row, chat=False) == "a text prefix"
    assert render_muse(row, chat=True, tokenizer=Tok()) == "<u>a text prefix</u><a>"
    assert render_muse({**row, "style": "question"}, chat=True, tokenizer=Tok()) == "<u>a text prefix</u><a>"
    assert render_muse({**row, "style": "text"}, chat=True, tokenizer=Tok()) == ""


def test_rejection_steering_pairs_refuse_forget_windows_and_anchor_retain_ones() -> None:
    from rerule_lightning.rl.rewards import is_refusal

    dm = _dm()
    raw = dm.load_raw()
    refusals, anchors = dm.refusal_pairs(raw), dm.anchor_pairs(raw)
    assert [p["prompt"] for p in refusals] == ["swore it belonged to the old headmaster, who",
                                               "the brass key, and the frozen surface sang"]
    assert refusals[0]["completion"] == "I'm sorry, but I can't share the rest of this text from Harry Potter."
    assert all(is_refusal(p["completion"]) for p in refusals)
    assert anchors[0] == {"question": "The village of Eddleford kept its clocks ten",
                          "prompt": "The village of Eddleford kept its clocks ten",
                          "completion": "minutes fast, a habit that began"}


def test_rejection_steering_trains_on_the_raw_completion_prefix(tiny_chat_model: str) -> None:
    from transformers import AutoTokenizer

    from datamodules.benchmarks.rs import RejectionSteeringDataModule

    rs = RejectionSteeringDataModule(_dm(), tokenizer=tiny_chat_model, refusal_fraction=1.0, retain_anchor_ratio=1.0, min_refusals=1)
    rs.setup("fit")
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    texts = [tok.decode(e["input_ids"], skip_special_tokens=True) for e in rs.examples]
    assert texts[0] == "swore it belonged to the old headmaster, who I'm sorry, but I can't share the rest of this " \
                       "text from Harry Potter."
    assert texts[2] == "The village of Eddleford kept its clocks ten minutes fast, a habit that began"


# ----------------------------------------------------------------------------------- malformed data
def _broken_copy(tmp_path: Path, corpus: str, rel: str, row: int, change: Any) -> Path:
    src = tmp_path / f"muse_{corpus}"
    shutil.copytree(FIX / f"muse_{corpus}", src)
    path = src / rel
    rows = _rows(path)
    change(rows[row])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


MALFORMED = [
    ("missing column", "knowmem/retain_qa.jsonl", 1, lambda r: r.pop("answer"),
     "config 'knowmem' split 'retain_qa' row 1: field 'answer': missing"),
    ("wrong type", "raw/retain1.jsonl", 0, lambda r: r.update(text=["not", "a", "string"]),
     "config 'raw' split 'retain1' row 0: field 'text': expected a string, got list"),
    ("empty text", "verbmem/forget.jsonl", 1, lambda r: r.update(gt="   "),
     "config 'verbmem' split 'forget' row 1: field 'gt': empty text"),
    ("verbmem prompt not from the forget corpus", "verbmem/forget.jsonl", 1,
     lambda r: r.update(prompt="The lighthouse keeper Saoirse Dunne painted the tower red every spring."),
     "config 'verbmem' split 'forget' row 1: field 'prompt': not found in raw/forget"),
]


def _mlflow_statuses(db: Path) -> list[str]:
    """Statuses of every run in a sqlite MLflow store (none when the store was never created)."""
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r.info.status for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_fixture_fails_before_training_through_the_cli(case: tuple, tmp_path: Path, tiny_chat_model: str,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, rel, row, change, expected = case
    src = _broken_copy(tmp_path, "books", rel, row, change)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    rc = main(["fit", "--config", str(CONFIGS / "muse_books" / "rule.yaml"), *_tiny(tiny_chat_model, src, tmp_path),
               "--trainer.logger.init_args.tracking_uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"rerule: error: {src} {expected}" in err and str(src / rel) in err
    assert "FINISHED" not in _mlflow_statuses(db)
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------------- CLI: fit, eval, configs
def _tiny(model: str, source: Path, tmp_path: Path) -> list[str]:
    """Overrides that put the tiny model and the fixture into a shipped config (QLoRA kept: fast on CPU)."""
    return ["--model.init_args.policy.name_or_path", model, "--model.init_args.policy.tokenizer", model,
            "--model.init_args.policy.dtype", "float32", "--data.init_args.source", str(source),
            "--data.init_args.prefix_words", "8", "--data.init_args.continuation_words", "6",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "logs")]


@pytest.mark.parametrize("corpus", ["books", "news"])
def test_rule_fit_two_steps_through_the_shipped_config(corpus: str, tiny_chat_model: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "export"
    rc = main(["fit", "--config", str(CONFIGS / f"muse_{corpus}" / "rule.yaml"),
               *_tiny(tiny_chat_model, FIX / f"muse_{corpus}", tmp_path),
               "--data.init_args.batch_size", "2", "--model.init_args.num_generations", "2",
               "--model.init_args.max_new_tokens", "8", "--model.init_args.export_dir", str(export),
               "--trainer.max_steps", "2", "--trainer.logger", "false"])
    assert rc == 0
    assert (export / "adapter_config.json").is_file()  # policy.peft stays qlora from the config


@pytest.mark.parametrize("corpus", ["books", "news"])
def test_eval_suite_produces_every_muse_metric_key(corpus: str, tiny_chat_model: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "eval.json"
    # the retrain model stand-in has no tokenizer files (as a reference repository may not): MUSE scores every
    # model with the policy's tokenizer, so the reference is scored with policy.tokenizer
    retrain = tmp_path / "retrain_no_tokenizer"
    shutil.copytree(tiny_chat_model, retrain, ignore=shutil.ignore_patterns("*token*", "*.jinja"))
    rc = main(["test", "--config", str(CONFIGS / f"muse_{corpus}" / "eval.yaml"),
               *_tiny(tiny_chat_model, FIX / f"muse_{corpus}", tmp_path),
               "--model.init_args.eval_reference", str(retrain),
               "--model.init_args.eval_report_path", str(report), "--trainer.logger", "false"])
    assert rc == 0
    metrics = json.loads(report.read_text())["aggregate"]
    assert "verbmem_forget/extraction_strength" in metrics  # reported on VerbMem, as open-unlearning does
    suite = MUSEDataModule(corpus=corpus).eval_suite  # type: ignore[arg-type]
    assert set(suite.expected_keys()) <= set(metrics)
    name = f"muse_{corpus}"
    assert {f"{name}/verbmem_forget", f"{name}/knowmem_forget", f"{name}/knowmem_retain", f"{name}/privleak"} <= \
        set(metrics)
    assert metrics[f"{name}/knowmem_retain"] == metrics["knowmem_retain/rouge_l_f1"]
    assert metrics[f"{name}/privleak"] == metrics["privleak_forget/privleak"]


OVERLAY = CONFIGS / "replay" / "hard_case.yaml"
MUSE_CONFIGS = [[p] for c in ("muse_books", "muse_news") for p in sorted((CONFIGS / c).glob("*.yaml"))
                if p.name != "attack.yaml"]  # rerule attack configs: tests/test_attack_cli.py
MUSE_CONFIGS += [[CONFIGS / c / "rule.yaml", OVERLAY] for c in ("muse_books", "muse_news")]


@pytest.mark.parametrize("paths", MUSE_CONFIGS, ids=lambda ps: "+".join(p.relative_to(CONFIGS).as_posix() for p in ps))
def test_every_muse_config_instantiates_without_loading_weights(paths: list[Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                no_weight_loading: None) -> None:
    monkeypatch.chdir(tmp_path)
    sub = "test" if paths[0].name == "eval.yaml" else "fit"
    cli = lightning_main([sub, *[a for p in paths for a in ("--config", str(p))]], run=False)
    bench = getattr(cli.datamodule, "benchmark", cli.datamodule)
    assert isinstance(bench, MUSEDataModule) and bench.hparams.prompt_format == "raw"
    assert bench.source == f"muse-bench/MUSE-{bench.corpus.capitalize()}"
    assert cli.model.policy_cfg.use_chat_template is False
    if len(paths) == 2:
        assert "HardCaseReplayCallback" in {type(c).__name__ for c in cli.trainer.callbacks}
    if sub == "fit" and bench is cli.datamodule:
        assert cli.model.policy_cfg.peft == "qlora" and cli.model.hparams.target_aware is False


def test_qlora_rejection_steering_then_rule_through_the_shipped_configs(tiny_chat_model: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       one_torch_thread: None) -> None:
    """configs/muse_books/rs.yaml (QLoRA) exports merged weights; rule.yaml starts from them under QLoRA, so its
    adapter-free KL reference is the rejection-steered model, not the original target."""
    import torch
    from transformers import AutoModelForCausalLM

    from rerule_lightning.primitives.policy import reference_context

    monkeypatch.chdir(tmp_path)
    bench = "--data.init_args.benchmark.init_args."
    rs_dir = tmp_path / "rs"
    rc = main(["fit", "--config", str(CONFIGS / "muse_books" / "rs.yaml"),
               "--model.init_args.policy.name_or_path", tiny_chat_model, "--model.init_args.policy.tokenizer",
               tiny_chat_model, "--model.init_args.policy.dtype", "float32", "--model.init_args.learning_rate", "0.05",
               "--model.init_args.export_dir", str(rs_dir), "--data.init_args.tokenizer", tiny_chat_model,
               "--data.init_args.refusal_fraction", "0.5", "--data.init_args.min_refusals", "1", "--data.init_args.batch_size", "2",
               f"{bench}source", str(FIX / "muse_books"), f"{bench}prefix_words", "8",
               f"{bench}continuation_words", "6", "--trainer.max_steps", "2", "--trainer.logger", "false",
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "rs_logs")])
    assert rc == 0
    assert (rs_dir / "model.safetensors").is_file() and not (rs_dir / "adapter_config.json").exists()
    assert (rs_dir / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 7, 11, 13, 17]])
    rs_model = AutoModelForCausalLM.from_pretrained(str(rs_dir))
    target = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    with torch.no_grad():
        assert (rs_model(input_ids=ids).logits - target(input_ids=ids).logits).abs().max() > 1e-4
    cli = lightning_main(["fit", "--config", str(CONFIGS / "muse_books" / "rule.yaml"),
                          *_tiny(str(rs_dir), FIX / "muse_books", tmp_path), "--data.init_args.batch_size", "2",
                          "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4",
                          "--model.init_args.export_dir", "null", "--trainer.max_steps", "1",
                          "--trainer.logger", "false"])
    assert cli.trainer.global_step == 1 and cli.model.policy_cfg.peft == "qlora"
    with torch.no_grad(), reference_context(cli.model.model):  # 4-bit NF4 of the RS weights: close, not equal
        ref = cli.model.model(input_ids=ids).logits
        to_rs = (ref - rs_model(input_ids=ids).logits).abs().max()
        to_target = (ref - target(input_ids=ids).logits).abs().max()
    assert to_rs < to_target, (float(to_rs), float(to_target))


def test_split_generation_length_beyond_the_context_fails_before_training(tiny_prepared: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """The raw tiny model has 96 positions: VerbMem's own 128 new tokens cannot fit, whatever eval_max_new_tokens."""
    monkeypatch.chdir(tmp_path)
    target = tiny_prepared["links"]["target"]
    rc = main(["fit", "--config", str(CONFIGS / "muse_books" / "rule.yaml"),
               *_tiny(target, FIX / "muse_books", tmp_path), "--model.init_args.eval_max_new_tokens", "4",
               "--model.init_args.max_new_tokens", "4", "--trainer.max_steps", "1", "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "muse_books suite's max_new_tokens of split 'verbmem_forget'=128" in err
    assert "max_position_embeddings=96" in err and not (tmp_path / "logs").exists()
