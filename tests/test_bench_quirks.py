"""Issue 15: the quirks of the benchmarks' released data and references, one test per row of the issue's table,
each through the loader path ``rerule fit`` uses (``prepare_data`` / ``setup`` of the shipped datamodules) on
hand-written fixtures that reproduce the quirk in the real schema."""

from __future__ import annotations

import json
import re
import shutil
from datetime import date
from pathlib import Path

import pytest
import tomllib

from datamodules.benchmarks.muse import MUSEDataModule, muse_suite
from datamodules.benchmarks.rs import RejectionSteeringDataModule
from datamodules.benchmarks.rwku import RWKUDataModule, rwku_suite
from datamodules.benchmarks.sources import SchemaError
from datamodules.benchmarks.tofu import TOFUDataModule
from rerule_lightning.cli.commands import main
from rerule_lightning.primitives.rouge import rouge_l
from rerule_lightning.rl.rewards import get_reward_fn

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
CONFIGS = ROOT / "configs"
SMALL = {"prefix_words": 8, "continuation_words": 6}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- 1: MUSE-Books ICL demo = evaluated question
def test_row1_muse_books_icl_demo_that_is_an_evaluated_question_is_kept_and_counted(capsys: pytest.CaptureFixture,
                                                                                   ) -> None:
    icl = _rows(FIX / "muse_books" / "knowmem" / "retain_qa_icl.jsonl")
    qa = _rows(FIX / "muse_books" / "knowmem" / "retain_qa.jsonl")
    assert qa[2]["question"] == qa[3]["question"] == icl[0]["question"]  # the fixture has the real quirk
    dm = MUSEDataModule(corpus="books", source=str(FIX / "muse_books"), batch_size=2, **SMALL)
    dm.prepare_data()
    out = capsys.readouterr().out
    assert (f"{FIX / 'muse_books'}: knowmem retain_qa_icl: 1 demonstration(s) also asked as 2 evaluated "
            "retain_qa question(s) (rows [2, 3]); kept, as MUSE does\n") in out
    dm.setup("fit")
    items = dm.eval_items["knowmem_retain"]
    assert [r["question"] for r in items] == [r["question"] for r in qa]  # nothing dropped
    assert items[2]["prompt"].startswith(f"Question: {icl[0]['question']}\nAnswer: {icl[0]['answer']}\n\n")
    strict = MUSEDataModule(corpus="books", source=str(FIX / "muse_books"), icl_overlap="error", **SMALL)
    with pytest.raises(SchemaError, match=r"config 'knowmem' split 'retain_qa_icl' row 0: field 'question': is "
                                          r"also evaluation question row 2 .*data.icl_overlap: keep"):
        strict.prepare_data()


# ------------------------------------------------------------------------- 2: MUSE-News empty raw text row
def test_row2_muse_news_empty_raw_text_is_skipped_and_counted(capsys: pytest.CaptureFixture) -> None:
    raw = _rows(FIX / "muse_news" / "raw" / "forget.jsonl")
    assert [bool(r["text"]) for r in raw] == [True, False, True]
    dm = MUSEDataModule(corpus="news", source=str(FIX / "muse_news"), batch_size=2, **SMALL)
    dm.prepare_data()
    assert (f"{FIX / 'muse_news'}: raw forget: skipped 1 of 3 rows with empty text (rows [1]); MUSE's data has "
            "them\n") in capsys.readouterr().out
    dm.setup("fit")
    docs = {r["id"].split("-")[1] for r in dm.pool if r["label"] == "forget"}
    assert docs == {"0", "2"}  # ids keep the dataset row index; the empty row gives no prompt
    strict = MUSEDataModule(corpus="news", source=str(FIX / "muse_news"), skip_empty_raw=False, **SMALL)
    with pytest.raises(SchemaError, match=r"config 'raw' split 'forget' row 1: field 'text': empty text"):
        strict.prepare_data()


# --------------------------------------------------------------------- 3: TOFU system prompt and fixed date
#: A chat template that, like Llama-3.2's, writes today's date unless ``date_string`` is given.
DATED_TEMPLATE = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
                  "Date: {{ date_string }}\n"
                  "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:\n{% endif %}")


@pytest.fixture
def dated_tokenizer(tiny_chat_model: str, tmp_path: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    tok.chat_template = DATED_TEMPLATE
    tok.save_pretrained(str(tmp_path / "tok"))
    return str(tmp_path / "tok")


def test_row3_tofu_chat_prompt_has_the_targets_system_prompt_and_fixed_date(dated_tokenizer: str) -> None:
    dm = TOFUDataModule(source=str(FIX / "tofu"), tokenizer=dated_tokenizer, rows_per_author=3, batch_size=2)
    dm.setup("fit")
    assert dm.pool[0]["prompt"] == ("Date: 10 Apr 2025\nSystem: You are a helpful assistant.\n"
                                    "User: What genre does Lena Varga write?\nAssistant:\n")
    assert all(r["prompt"].startswith("Date: 10 Apr 2025\nSystem: You are a helpful assistant.\n")
               for rows in dm.eval_items.values() for r in rows)
    # what the fixed date prevents: without it the template writes today's date into every prompt
    drift = TOFUDataModule(source=str(FIX / "tofu"), tokenizer=dated_tokenizer, rows_per_author=3, batch_size=2,
                           date_string=None, system_prompt=None)
    drift.setup("fit")
    assert drift.pool[0]["prompt"] == (f"Date: {date.today().strftime('%d %b %Y')}\n"
                                       "User: What genre does Lena Varga write?\nAssistant:\n")
    for cfg in ("eval.yaml", "rule.yaml", "rs.yaml"):
        text = (CONFIGS / "tofu" / cfg).read_text()
        assert 'system_prompt: "You are a helpful assistant."' in text and 'date_string: "10 Apr 2025"' in text


# ------------------------------------------------------------- 4: reference directory without a tokenizer
def test_row4_reference_statistics_use_the_policy_tokenizer(tiny_chat_model: str, tmp_path: Path) -> None:
    from rerule_lightning.modules.eval_hooks import compute_reference

    bare = tmp_path / "retain_no_tokenizer"
    shutil.copytree(tiny_chat_model, bare)
    for f in bare.iterdir():
        if "token" in f.name or f.name.endswith((".model", ".txt")) or f.name == "chat_template.jinja":
            f.unlink()
    dm = TOFUDataModule(source=str(FIX / "tofu"), tokenizer=tiny_chat_model, rows_per_author=3, batch_size=2)
    dm.setup("test")
    items = dm.reference_items()
    with pytest.raises(Exception):  # noqa: B017  (transformers' error for a directory without a tokenizer)
        compute_reference(str(bare), items, str(tmp_path / "a.json"), use_chat_template=True)
    got = compute_reference(str(bare), items, str(tmp_path / "b.json"), use_chat_template=True,
                            tokenizer=tiny_chat_model)
    want = compute_reference(tiny_chat_model, items, str(tmp_path / "c.json"), use_chat_template=True)
    assert got["forget_truth_ratios"] == want["forget_truth_ratios"] and got["mia_auc"] == want["mia_auc"]
    assert got["settings"]["tokenizer"] == tiny_chat_model


# ------------------------------------------------------------------------------------ 5: RWKU's own ROUGE
def test_row5_rwku_metrics_and_reward_use_the_rouge_packages_semantics() -> None:
    pred, ref = "stephen king was born in portland, maine", "Stephen King was born in Portland, Maine."
    assert rouge_l(pred, ref).recall == 1.0  # rouge_score: lower-cased, punctuation dropped
    assert rouge_l(pred, ref, "rwku").recall == pytest.approx(3 / 7)  # case- and punctuation-sensitive
    assert {s.name: s.rouge for s in rwku_suite().splits} == {s: "rwku" for s in rwku_suite().split_names}
    from rerule_lightning.evaluation.evaluator import UnlearningEvaluator

    ev = UnlearningEvaluator(rwku_suite(), max_new_tokens=4)
    assert {m["rouge_l_recall"].impl for m in ev.metrics.values()} == {"rwku"}
    ev.metrics["forget_level1"]["rouge_l_recall"].update([pred], [ref])
    assert float(ev.metrics["forget_level1"]["rouge_l_recall"].compute()) == pytest.approx(3 / 7)
    reward = get_reward_fn("rule_rwku")
    assert reward(["p"], [pred], labels=["boundary"], references=[ref]) == [1.0]  # 3/7 >= 0.3
    low = "stephen king, portland maine"  # rouge_score: 4 of 7 reference tokens; rwku: no word matches exactly
    assert (rouge_l(low, ref).recall, rouge_l(low, ref, "rwku").recall) == (pytest.approx(4 / 7), 0.0)
    assert get_reward_fn("rule")(["p"], [low], labels=["boundary"], references=[ref]) == [1.0]
    assert reward(["p"], [low], labels=["boundary"], references=[ref]) == [0.5]
    assert "reward: rule_rwku" in (CONFIGS / "rwku" / "rule.yaml").read_text()


# ------------------------------------------------------------- 6: RWKU RL data from its training-side files
def test_row6_rwku_rl_prompts_from_training_side_questions_with_parallel_boundary(
        tiny_chat_model: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = [r for r in _rows(FIX / "rwku" / "train_refusal_llama3" / "train.jsonl") if r["subject"] == "Stephen King"]
    dm = RWKUDataModule(source=str(FIX / "rwku"), targets=["Stephen King"], swaps_per_target=2,
                        tokenizer=tiny_chat_model, reference_model=tiny_chat_model, reference_max_new_tokens=4,
                        cache_dir=str(tmp_path))
    dm.prepare_data()
    assert ("target 'Stephen King': 32 forget RL prompts (7 training-side questions, 25 template questions/blanks/"
            "intro), 57 boundary (7 training-side questions about related entities, 50 template swaps/intros)"
            ) in capsys.readouterr().out
    dm.setup("fit")
    forget = [r["question"] for r in dm.pool if r["kind"] == "forget_train_question"]
    probe = "Which novel by Stephen King features the Overlook Hotel?"  # a forget_level2 probe: never RL
    assert forget == [r["instruction"] for r in train if r["instruction"] != probe]
    boundary = [(r["target"], r["question"]) for r in dm.pool if r["kind"] == "boundary_swap_train"]
    assert len(boundary) == len(forget)  # 1:1
    assert boundary[:3] == [("Dean Koontz", "In which state did Dean Koontz spend most of his childhood?"),
                            ("Bruce Lee", "What was the first novel Bruce Lee sold to a publisher?"),
                            ("Dean Koontz", "Under which pen name did Dean Koontz publish several early novels?")]
    assert not any("Tabitha" in q or "Overlook" in q for _, q in boundary)  # no target name: no swap; no probe
    assert all(r["reference"] for r in dm.pool if r["kind"] == "boundary_swap_train")  # the original model's
    rs = RejectionSteeringDataModule(dm, tiny_chat_model, refusal_fraction=1.0, min_refusals=30,
                                     retain_anchor_ratio=10.0)  # every anchor
    rs.setup("fit")
    refusals = [p for p in rs.pairs if p["kind"] == "refusal"]
    assert len(refusals) == 32 and {q for q in forget} <= {p["question"] for p in refusals}
    anchors = {p["question"] for p in rs.pairs if p["kind"] == "anchor"}
    assert {q for _, q in boundary} <= anchors  # anchors: parallel questions with the original model's answers
    # a local source without the training-side config: templates only, said once
    src = tmp_path / "rwku"
    shutil.copytree(FIX / "rwku", src)
    shutil.rmtree(src / "train_refusal_llama3")
    bare = RWKUDataModule(source=str(src), targets=["Stephen King"], swaps_per_target=0, prompt_format="raw")
    bare.load_raw()
    assert "train_refusal_llama3/train absent: forget prompts and RS refusals come from the question templates " \
           "only" in capsys.readouterr().out


# ------------------------------------------------------------------- 7: rejection steering needs material
def test_row7_rejection_steering_refuses_to_run_on_too_few_refusals(tiny_chat_model: str, tmp_path: Path) -> None:
    bench = RWKUDataModule(source=str(FIX / "rwku"), targets=1, swaps_per_target=1, tokenizer=tiny_chat_model,
                           reference_model=tiny_chat_model, cache_dir=str(tmp_path))
    rs = RejectionSteeringDataModule(bench, tiny_chat_model, refusal_fraction=0.1, min_refusals=8)
    with pytest.raises(ValueError, match=r"rejection steering would train on \d+ refusal example\(s\) "
                                         r"\(data.refusal_fraction=0.1 of \d+ forget prompts\), fewer than "
                                         r"data.min_refusals=8"):
        rs.setup("fit")
    with pytest.raises(ValueError, match="data.min_refusals=0: must be >= 1"):
        RejectionSteeringDataModule(bench, tiny_chat_model, min_refusals=0)


# ------------------------------------------------------------------ 8: "Please forget X." is never a prompt
def test_row8_rwku_forget_request_is_never_a_prompt_or_anchor(tiny_chat_model: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    intros = _rows(FIX / "rwku" / "forget_target" / "train.jsonl")
    assert all(r["intro"].startswith(f"Please forget {r['target']}. ") for r in intros)
    dm = RWKUDataModule(source=str(FIX / "rwku"), targets=1, swaps_per_target=2, tokenizer=tiny_chat_model)
    raw = dm.load_raw()
    assert "forget_target: removed the leading \"Please forget X.\" sentence from 4 of 4 intros" in \
        capsys.readouterr().out
    pool = dm._unreferenced_pool(raw)
    texts = [r["question"] for r in pool] + [r["prompt"] for r in pool]
    texts += [a["question"] + a["completion"] for a in dm.anchor_pairs(raw)]
    assert not [t for t in texts if "please forget" in t.lower()]
    intro = next(r for r in pool if r["kind"] == "forget_intro")
    assert intro["question"] == "Stephen King is a prolific American author ___."


# ---------------------------------------------------------------------------- 9: KnowMem "Answer: " prompt
def test_row9_knowmem_prompt_ends_with_answer_and_a_space() -> None:
    dm = MUSEDataModule(corpus="books", source=str(FIX / "muse_books"), batch_size=2, **SMALL)
    dm.setup("test")
    for split in ("knowmem_forget", "knowmem_retain"):
        assert all(r["prompt"].endswith(f"Question: {r['question']}\nAnswer: ") for r in dm.eval_items[split])
        assert all(r["prompt"].count("\nAnswer: ") == len(r["few_shot"]) + 1 for r in dm.eval_items[split])


# ------------------------------------------------------------------------------------ 10: MUSE's scoring
def test_row10_muse_rouge_reference_cut_privleak_encoding_and_verbmem_extraction(tiny_chat_model: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rerule_lightning.evaluation.evaluator import cut_references, teacher_forced_stats

    suite = muse_suite("muse_books")
    assert {s.name: s.rouge for s in suite.splits if s.generate} == {
        "verbmem_forget": "rouge_score_nostem", "knowmem_forget": "rouge_score_nostem",
        "knowmem_retain": "rouge_score_nostem"}
    verb = suite.spec("verbmem_forget")
    assert verb.reference_max_tokens == 128 and "extraction_strength" in verb.metric_names()
    assert rouge_l("the runners ran", "the runner runs", "rouge_score_nostem").recall == pytest.approx(1 / 3)
    assert rouge_l("the runners ran", "the runner runs").recall == pytest.approx(2 / 3)  # stemmer on
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    long = " ".join(["Wren Halloway found the brass key"] * 40)
    cut = cut_references([long, "short"], tok, 128)
    assert len(tok(cut[0], add_special_tokens=False)["input_ids"]) <= 128 < len(tok(long)["input_ids"])
    assert cut[1] == "short" and long.startswith(cut[0])
    # privleak: the text is scored as encode(text) after bos, not " " + text
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    text = "The village of Eddleford kept its clocks ten minutes fast"
    st = teacher_forced_stats(model, tok, [""], [text])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert st["target_ids"][0, :len(ids)].tolist() == ids and int(st["mask"][0].sum()) == len(ids)


# ------------------------------------------------------------------------ 11: transformers' dtype keyword
def test_row11_transformers_floor_has_from_pretrained_dtype() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in deps if d.startswith("transformers"))
    major, minor = map(int, re.search(r">=(\d+)\.(\d+)", floor).groups())
    assert (major, minor) >= (4, 56)


# ---------------------------------------------------------------- 12: a missing stage export names the stage
def test_row12_rule_before_rs_points_to_the_benchmarks_rs_stage(tiny_chat_model: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["fit", "--config", str(CONFIGS / "tofu" / "rule.yaml"),
               "--model.init_args.policy.tokenizer", tiny_chat_model, "--data.init_args.source", str(FIX / "tofu"),
               "--data.init_args.tokenizer", tiny_chat_model, "--data.init_args.rows_per_author", "3",
               "--trainer.logger", "false", "--trainer.accelerator", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("rerule: error: --model.init_args.policy.name_or_path='.cache/rerule/runs/tofu/rs': directory not found. It is the export "
            "of the tofu stage 'rs': run `rerule fit --config configs/tofu/rs.yaml` first.") in err
    assert "rerule prepare" not in err


# ------------------------------------------------------------------- 13: datasets' to_json(lines=False)
def test_row13_json_file_with_one_array_per_chunk_loads(tmp_path: Path) -> None:
    src = tmp_path / "tofu"
    shutil.copytree(FIX / "tofu", src)
    rows = _rows(src / "retain90" / "train.jsonl")
    (src / "retain90" / "train.jsonl").unlink()
    # datasets writes one JSON array per 1000 rows, one per line; the fixture uses chunks of 4 rows
    chunks = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    assert len(chunks) > 1
    (src / "retain90" / "train.json").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    dm = TOFUDataModule(source=str(src), rows_per_author=3, prompt_format="raw")
    assert dm.load_raw()["retain"] == rows
    (src / "retain90" / "train.json").write_text(json.dumps(chunks[0]) + "\n{\"question\": \"x\"}\n")
    with pytest.raises(SchemaError, match=r"config 'retain90' split 'train' row 4: bad JSON on line 2: expected a "
                                          r"JSON array of rows \(one or more\), got dict"):
        dm.load_raw()
