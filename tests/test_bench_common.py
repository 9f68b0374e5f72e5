"""The common part of the real benchmarks: row loading and schema validation, EvalSuite / SplitSpec, the
BenchmarkDataModule base (rendering, probe rule, subsampling) and the suite-driven evaluator."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from datamodules.benchmarks.base import BenchmarkDataModule, normalise_question
from datamodules.benchmarks.sources import SchemaError, load_rows, load_validated, validate_rows
from rerule_lightning.evaluation.suite import EvalSuite, SplitSpec, embedded_suite
from rerule_lightning.primitives.generation import cut_at_stop

SCHEMA = {"q": "text", "s": "str", "n": "int", "x": "number", "opts": "text_list", "tags": "str_list", "o": "text?"}
GOOD = {"q": "Who?", "s": "", "n": 3, "x": 0.5, "opts": ["a", "b"], "tags": [], "o": None}


def _check(rows: list[dict]) -> list[dict]:
    return validate_rows(rows, SCHEMA, dataset="org/ds", config="cfg", split="train", path="d/cfg/train.jsonl")


@pytest.mark.parametrize("field,value,problem", [
    ("q", "  ", "empty text"), ("q", 3, "expected non-empty text, got int"), ("s", None, "is null"),
    ("n", 1.5, "expected an integer, got float"), ("n", True, "expected an integer, got bool"),
    ("x", "1", "expected a number, got str"), ("opts", [], "empty list"), ("opts", ["a", ""], "item 1: empty text"),
    ("opts", "a", "expected a list of strings, got str"), ("tags", [1], "item 0: expected a string, got int"),
    ("o", "", "empty text"),
])
def test_validate_rows_names_dataset_config_split_row_field(field: str, value: Any, problem: str) -> None:
    bad = {**GOOD, field: value}
    with pytest.raises(SchemaError) as e:
        _check([GOOD, bad])
    assert str(e.value) == f"org/ds config 'cfg' split 'train' row 1: field {field!r}: {problem} (file d/cfg/train.jsonl)"
    assert (e.value.row, e.value.field) == (1, field)


def test_validate_rows_accepts_good_rows_missing_optional_and_rejects_empty_split() -> None:
    no_opt = {k: v for k, v in GOOD.items() if k != "o"}
    assert _check([GOOD, no_opt]) == [GOOD, no_opt]
    with pytest.raises(SchemaError, match=r"^org/ds config 'cfg' split 'train' row 0: field 'q': missing$"):
        validate_rows([{}], {"q": "text"}, dataset="org/ds", config="cfg", split="train")
    with pytest.raises(SchemaError, match=r"^org/ds config 'cfg' split 'train': no rows$"):
        validate_rows([], SCHEMA, dataset="org/ds", config="cfg", split="train")
    with pytest.raises(ValueError, match="unknown schema kind 'txt'"):
        validate_rows([GOOD], {"q": "txt"}, dataset="d", config="c", split="s")


def test_load_rows_local_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text('{"q": "x"}\n\n{"q": "y"}\n')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "test.json").write_text(json.dumps([{"q": "z"}]))
    assert load_rows(str(tmp_path), "a", "train") == [{"q": "x"}, {"q": "y"}]
    assert load_rows(str(tmp_path), "b", "test") == [{"q": "z"}]
    with pytest.raises(FileNotFoundError, match=r"^D config 'c' split 'train': no data file; tried .*c/train\.jsonl, "
                                                r".*c/train\.json, .*c/train\.parquet$"):
        load_rows(str(tmp_path), "c", "train", dataset="D")
    (tmp_path / "a" / "bad.jsonl").write_text('{"q": "x"}\n[1, 2]\n')
    with pytest.raises(SchemaError, match=r"row 1: expected a JSON object, got list"):
        load_rows(str(tmp_path), "a", "bad", dataset="D")
    (tmp_path / "a" / "bytes.jsonl").write_bytes(b'{"q": "x"}\n{"q": "\xff"}\n')
    with pytest.raises(SchemaError, match=r"^D config 'a' split 'bytes' row 1: not valid UTF-8"):
        load_rows(str(tmp_path), "a", "bytes", dataset="D")
    (tmp_path / "a" / "empty.jsonl").write_text('{"q": " "}\n')
    with pytest.raises(SchemaError, match=r"row 0: field 'q': empty text \(file .*a/empty\.jsonl\)$"):
        load_validated(str(tmp_path), "a", "empty", {"q": "text"}, dataset="D")
    with pytest.raises(FileNotFoundError, match="source directory './nowhere' not found"):
        load_rows("./nowhere", "a", "train", dataset="D")


def test_suite_keys_subset_and_validation() -> None:
    suite = EvalSuite("toy", [SplitSpec("f", truth_ratio=True), SplitSpec("h", generate=False)],
                      forget_quality_split="f", mia=("f", "h"), utility_splits=["f"], headline={"fq": "f/forget_quality"})
    assert suite.expected_keys() == [
        "f/refusal_rate", "f/answer_accuracy", "f/wrong_answer_rate", "f/degenerate_rate", "f/rouge_l_recall",
        "f/rouge_l_f1", "f/fluency", "f/probability", "f/truth_ratio", "f/extraction_strength", "f/min_k", "h/probability", "h/extraction_strength", "h/min_k",
        "f/forget_quality", "f/mia_auc", "f/privleak", "utility/model_utility", "toy/fq"]
    sub = suite.subset(["h"])
    assert (sub.forget_quality_split, sub.mia, sub.utility_splits, sub.headline) == (None, None, [], {})
    assert len(embedded_suite(["forget", "retain", "world_facts", "holdout"]).expected_keys()) == 4 * 11 + 4
    with pytest.raises(ValueError, match="forget_quality_split 'h' needs truth_ratio=True"):
        EvalSuite("x", [SplitSpec("h")], forget_quality_split="h")
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['z'\]"):
        EvalSuite("x", [SplitSpec("h")], utility_splits=["z"])
    assert cut_at_stop(" Paris\n\nQuestion: next", ["\n\n", "Question"]) == "Paris"
    assert cut_at_stop("Paris. Question", ["Question"]) == "Paris." and cut_at_stop(" x ", []) == "x"


class ToyBench(BenchmarkDataModule):
    """Two forget prompts, two boundary prompts, a forget and a retain eval split."""

    dataset_name = "toy/bench"

    def __init__(self, leak: bool = False, source: str | None = None, batch_size: int = 2,
                 eval_max_items: int | None = None, prompt_format: str = "raw", tokenizer: str | None = None,
                 eval_splits: list[str] | None = None) -> None:
        super().__init__(source=source, batch_size=batch_size, eval_max_items=eval_max_items,
                         prompt_format=prompt_format, tokenizer=tokenizer, eval_splits=eval_splits)

    def build_suite(self) -> EvalSuite:
        return EvalSuite("toy", [SplitSpec("forget", truth_ratio=True), SplitSpec("retain", generate=False)],
                         forget_quality_split="forget", mia=("forget", "retain"))

    def load_raw(self) -> dict[str, list[dict]]:
        return {}

    def build_rl_pool(self, raw: dict) -> list[dict]:
        row = dict(prompt=None, kind="k", reference="", target="T", value="")
        boundary_q = "Who is R1?" if self.hparams.leak else "Who is B?"
        return [dict(row, id="f0", question="Who is F?", label="forget"),
                dict(row, id="f1", question="Verbatim prefix", prompt="Once upon", label="forget"),
                dict(row, id="b0", question=boundary_q, label="boundary", reference="B is a cook.")]

    def build_eval_items(self, raw: dict) -> dict[str, list[dict]]:
        def item(s: str, i: int, q: str) -> dict:
            return dict(id=f"{s}{i}", prompt=None, question=q, answer="A cook.", value="cook",
                        paraphrased_answer=None if i else "Cook.", perturbed_answer=[] if i else ["A pilot.", "A vet."],
                        target="T")
        return {"forget": [item("forget", 0, "Who is F?"), item("forget", 1, "Where is F?")],
                "retain": [item("retain", i, f"Who is R{i}?") for i in range(3)]}


def test_base_renders_checks_probes_and_subsamples() -> None:
    dm = ToyBench(eval_max_items=2)
    assert dm.hparams.leak is False and dm.hparams.batch_size == 2 and dm.eval_splits == ["forget", "retain"]
    dm.setup("fit")
    assert [r["prompt"] for r in dm.pool] == ["Question: Who is F?\nAnswer:", "Once upon", "Question: Who is B?\nAnswer:"]
    assert [r["id"] for r in dm.eval_items["retain"]] == ["retain1", "retain2"]  # random.Random(0).sample
    assert dm.eval_items["forget"][0]["split"] == "forget"
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["label"]) == ["boundary", "forget"]
    loaders = dm.val_dataloader()
    assert [next(iter(dl))["id"] for dl in loaders] == [["forget0", "forget1"], ["retain1", "retain2"]]
    again = ToyBench(eval_max_items=2)
    again.setup("fit")
    other = ToyBench(eval_max_items=3)
    other.setup("fit")
    assert dm.data_signature() == again.data_signature() != other.data_signature()
    with pytest.raises(ValueError, match=r"RL boundary prompt 'b0' is the evaluation item 'retain1' of split 'retain'"):
        ToyBench(leak=True).setup("fit")
    with pytest.raises(ValueError, match=r"eval_splits=\['nope'\]: unknown or repeated split\(s\) \['nope'\]"):
        ToyBench(eval_splits=["nope"])
    with pytest.raises(ValueError, match="prompt_format='chat' needs data.tokenizer"):
        ToyBench(prompt_format="chat").setup("fit")
    assert normalise_question("  Who is  F? ") == "who is f"


def test_evaluator_builds_the_metrics_each_split_asks_for(tiny_prepared: dict, one_torch_thread: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rerule_lightning.evaluation.evaluator import UnlearningEvaluator
    from rerule_lightning.modules.eval_hooks import evaluate_items

    path = tiny_prepared["links"]["target"]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    dm = ToyBench()
    dm.setup("test")
    suite = EvalSuite("toy", [SplitSpec("forget", truth_ratio=True, max_new_tokens=3, stop=["\n"]),
                              SplitSpec("retain", generate=False)],
                      forget_quality_split="forget", mia=("forget", "retain"), headline={"auc": "forget/mia_auc"})
    ev = UnlearningEvaluator(suite, retain_reference={"forget_truth_ratios": [0.5], "mia_auc": 0.5},
                             max_new_tokens=50, render_prompts=False)
    evaluate_items(ev, model, tok, dm.eval_items)
    out = ev.compute()
    assert set(out) == set(suite.expected_keys()) - {"utility/model_utility"}
    assert out["toy/auc"] == out["forget/mia_auc"] and 0.0 <= out["forget/mia_auc"] <= 1.0
    rec = ev.per_item()
    assert [r["id"] for r in rec] == ["forget0", "forget1", "retain0", "retain1", "retain2"]
    assert math.isfinite(rec[0]["truth_ratio"]) and math.isnan(rec[1]["truth_ratio"])  # no paraphrase / options
    assert ev.metrics["forget"]["truth_ratio"].per_item().numel() == 1
    # the split's own max_new_tokens (3, not the evaluator's 50) bounds the answer: it is exactly the greedy
    # 3-token continuation. (Re-encoding the decoded text is no measure: byte-level BPE need not give back the
    # generated tokens, e.g. 3 generated tokens re-encode to 4 on some machines.)
    from rerule_lightning.primitives.generation import cut_at_stop, greedy_generate

    assert rec[0]["prompt"] == "Question: Who is F?\nAnswer:"
    assert rec[0]["prediction"] == cut_at_stop(greedy_generate(model, tok, [rec[0]["prompt"]], 3)[0], ["\n"])
    assert "\n" not in rec[0]["prediction"] and rec[2]["prediction"] is None and "refusal" not in rec[2]


def _memory_estimate() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_estimate.py"
    spec = importlib.util.spec_from_file_location("memory_estimate", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["memory_estimate"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_memory_estimate_matches_hand_computed_numbers() -> None:
    me = _memory_estimate()
    # h 64, 2 layers, 4 heads / 2 kv heads (kv dim 32), MLP 128, vocab 100, tied embeddings
    arch = me.Arch(64, 2, 4, 2, 128, 100, True)
    # linears per layer: 64*64 + 2*64*32 + 64*64 + 2*64*128 + 128*64 = 36864; norms 64 * 5; embeddings 6400
    assert (arch.linear_params(), arch.other_params()) == (73728, 6720)
    est = me.estimate(arch, "grpo", "qlora", "bfloat16", n_seq=8, prompt=10, completion=6, checkpointing=True,
                      lora_r=4, beta=0.01)
    # NF4 + double quant; embeddings and norms up-cast to float32 by prepare_model_for_kbit_training
    assert est["weights"] == 73728 * 0.5 + 73728 * (1 / 64 + 4 / 16384) + 6720 * 4 == 64914
    assert est["trainable"] == 4 * 2 * 1024 * 16 == 131072  # r (in + out) summed = 4 * 1024 per layer, 16 B each
    # inputs + 1 layer in bf16, + the two float32 normed inputs of the recomputed layer: 2 * 64 * (4 - 2) B per token
    assert est["activations"] == 8 * 16 * ((2 * 64 + (6 * 64 + 2 * 32 + 4 * 128)) * 2 + 256) == 311296
    assert est["logits"] == 8 * 6 * (100 * (4 + 4) + 64 * 4) == 50688  # float32 lm_head and its float32 input
    assert est["per_token"] == 3 * 4 * 8 * 6 == 576  # behaviour, reference, loss log-probs of the whole batch
    assert est["kv_cache"] == 8 * 16 * 2 * 2 * 32 * 2 == 32768
    assert est["peak"] == 64914 + 131072 + 2 ** 30 + 576 + 311296 + 50688
    # micro-batches of 2: activations and logits of 2 sequences, the kv cache and per-token tensors of all 8
    micro = me.estimate(arch, "grpo", "qlora", "bfloat16", n_seq=8, prompt=10, completion=6, checkpointing=True,
                        lora_r=4, beta=0.01, micro_batch_size=2)
    assert (micro["activations"], micro["logits"]) == (311296 / 4, 50688 / 4)
    assert (micro["kv_cache"], micro["per_token"]) == (32768, 576)
    gen = me.estimate(arch, "grpo", "qlora", "bfloat16", 8, 10, 6, True, lora_r=4, generation_batch_size=4)
    assert gen["kv_cache"] == 32768 / 2  # 4 of the 8 sequences per generate call
    full = me.estimate(arch, "grpo", "full", "bfloat16", 8, 10, 6, checkpointing=False, beta=0.01)
    assert full["weights"] == 2 * 80448 * 2 and full["trainable"] == 80448 * 6  # reference copy; grad + AdamW
    assert full["activations"] == 8 * 16 * 2 * 960 * 2
    assert me.resolve_arch("open-unlearning/tofu_Llama-3.2-1B-Instruct_full").vocab == 128256
