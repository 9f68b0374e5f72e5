"""``rerule attack`` through the command line: every attack on the tiny world, the real-benchmark attack configs on
their fixtures, and bad attack configs (one error line, nothing written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rerule_lightning.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FIX = ROOT / "tests" / "fixtures"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _embedded(tiny: dict, tmp_path: Path, *extra: str) -> list[str]:
    links = tiny["links"]
    # the tiny model has 96 positions: shorter answers and one in-context demonstration fit
    return ["attack", "--config", str(CONFIGS / "embedded" / "attack.yaml"), "--model", links["target"],
            "--target_model", links["target"], "--retain_model", links["retain"],
            "--data.init_args.world_dir", links["world"], "--output_dir", str(tmp_path / "out"),
            "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--max_new_tokens", "24",
            "--adversarial.num_demos", "1", *extra]


@pytest.mark.slow
def test_every_attack_through_the_cli_on_the_tiny_world(tiny_prepared: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    # k = 1, 4, 16 samples (the shipped 1, 8, 32 cost twice the time on the same code path)
    assert main(_embedded(tiny_prepared, tmp_path, "--relearning.models", "[model, retain]", "--sampling.ks",
                          "[1, 4, 16]")) == 0
    out = tmp_path / "out"
    res = json.loads((out / "attack.json").read_text())
    assert list(res["attacks"]) == ["sampling", "quantization", "relearning", "adversarial"]
    # the unattacked target answers every fact (it learned them all) and refuses none
    base = res["unattacked"]["metrics"]
    assert base["forget/answer_accuracy"] == 1.0 and base["forget/refusal_rate"] == 0.0
    assert "forget/truth_ratio" in base and "boundary_easy/rouge_l_recall" in base  # every metric of the suite
    samp = res["attacks"]["sampling"]["settings"]["t1_p1"]
    for split in ("forget", "boundary_hard", "boundary_easy"):
        leaks = [samp[f"{split}/leak_at_{k}"] for k in (1, 4, 16)]
        assert leaks == sorted(leaks)  # leak@k never falls with k (nested samples)
    q = res["attacks"]["quantization"]
    assert q["backend"] == "bitsandbytes" and sorted(q["settings"]) == ["4bit", "8bit"]
    assert set(base) >= set(q["settings"]["8bit"])  # every metric, beside its unattacked value
    rel = res["attacks"]["relearning"]
    assert rel["halves"]["first"] == ["Oskar Ishikawa"] and rel["halves"]["second"] == ["Vesna Achterberg"]
    assert json.loads((out / "relearn_halves.json").read_text()) == rel["halves"]
    assert sorted(rel["settings"]) == sorted(f"{p}/{m}/steps_{k}" for p in ("lora", "full") for m in ("model", "retain")
                                             for k in (0, 5, 10, 25))
    # sanity: relearning the retain model (never saw the forget authors) teaches only the trained half
    for peft in ("lora", "full"):
        curve = {k: rel["settings"][f"{peft}/retain/steps_{k}"] for k in (0, 5, 10, 25)}
        first = [curve[k]["forget_first_half/answer_accuracy"] for k in (0, 5, 10, 25)]
        second = [curve[k]["forget_second_half/answer_accuracy"] for k in (0, 5, 10, 25)]
        assert first[0] == 0.0 and first[-1] >= 0.8, (peft, first)
        # at most 2 of the 18 held-out items by chance (guessing a value from its pool: ~1 in 18)
        assert max(second) <= 2 / 18 + 1e-9, (peft, second)
    adv = res["attacks"]["adversarial"]["settings"]
    assert sorted(adv) == sorted(["prefix_injection", "affirmative_suffix", "role_play", "reverse_query", "in_context",
                                  "description"])
    assert all(set(m) >= {"forget/answer_accuracy", "boundary_hard/refusal_rate"} for m in adv.values())
    table = res["table"]
    assert {r["attack"] for r in table} == {"none", "sampling", "quantization", "relearning", "adversarial"}
    md = (out / "attack.md").read_text()
    assert "Quantization backend: bitsandbytes." in md and "| sampling | t1_p1 | forget | leak_at_16 |" in md
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["rerule.stage"] == "attack"
    assert run.data.metrics["attack/sampling/t1_p1/forget/leak_at_16"] == samp["forget/leak_at_16"]
    assert run.data.metrics["attack/none/greedy/forget/answer_accuracy"] == 1.0
    assert run.data.params["quantization.backend"] == "auto"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert arts == {"attack.json", "attack.md", "relearn_halves.json"}


@pytest.mark.parametrize(("flags", "message"), [
    (["--sampling.ks", "[8, 1]"], "sampling.ks=[8, 1]: must be strictly increasing"),
    (["--quantization.bits", "[3]"], "quantization.bits=[3]: each must be 4 or 8"),
    (["--quantization.backend", "gptq"], "quantization.backend='gptq'"),
    (["--relearning.learning_rate", "0"], "relearning.learning_rate=0.0: must be finite and > 0"),
    (["--relearning.peft", "[qlora]"], "relearning.peft=['qlora']: each must be 'lora' or 'full'"),
    (["--adversarial.kinds", "[jailbreak]"], "adversarial.kinds=['jailbreak']: each must be one of"),
    (["--attacks", "[sampling, melting]"], "--attacks=['sampling', 'melting']: each must be one of"),
    (["--sampling.splits", "[retain]"], "sampling.splits: split(s) ['retain'] are not evaluated by data"),
    (["--retain_model", "null"], "relearning.models includes 'retain': set --retain_model"),
    (["--model", "/nonexistent/model"], "--model='/nonexistent/model': directory not found"),
])
def test_bad_attack_config_is_one_error_line_before_any_work(tiny_prepared: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture, flags: list[str],
                                                              message: str) -> None:
    assert main(_embedded(tiny_prepared, tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rerule: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_adversarial_on_a_benchmark_without_probes_fails_before_any_model_loads(tiny_chat_model: str, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    argv = ["attack", "--config", str(CONFIGS / "tofu" / "attack.yaml"), *_tofu(tiny_chat_model, tmp_path),
            "--attacks", "[adversarial]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rerule: error: adversarial: TOFUDataModule has no adversarial prompts"), err
    assert not (tmp_path / "out" / "attack.json").exists()


def _tofu(model: str, tmp_path: Path) -> list[str]:
    return ["--model", model, "--target_model", model, "--retain_model", model, "--tokenizer", model,
            "--data.init_args.source", str(FIX / "tofu"), "--data.init_args.tokenizer", model,
            "--data.init_args.rows_per_author", "3", "--dtype", "float32", "--max_new_tokens", "16",
            "--relearning.steps", "[1, 2]", "--relearning.batch_size", "2", "--relearning.models", "[model, retain]",
            "--output_dir", str(tmp_path / "out"), "--tracking_uri", "null"]


@pytest.mark.slow
def test_tofu_attack_config_on_the_fixture(tiny_chat_model: str, tmp_path: Path) -> None:
    assert main(["attack", "--config", str(CONFIGS / "tofu" / "attack.yaml"), *_tofu(tiny_chat_model, tmp_path)]) == 0
    res = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert sorted(res["attacks"]) == ["quantization", "relearning"]
    q = res["attacks"]["quantization"]["settings"]
    assert {"forget/truth_ratio", "retain/rouge_l_recall", "forget/probability"} <= set(q["4bit"])
    halves = res["attacks"]["relearning"]["halves"]
    assert halves["group_by"] == "target" and not set(halves["first"]) & set(halves["second"])
    assert halves["first"] and halves["second"]
    assert "full/retain/steps_2" in res["attacks"]["relearning"]["settings"]
    assert "mlflow_run_id" not in res  # --tracking_uri null: no MLflow run


@pytest.mark.slow
def test_muse_attack_config_on_the_fixture(tiny_chat_model: str, tmp_path: Path) -> None:
    argv = ["attack", "--config", str(CONFIGS / "muse_books" / "attack.yaml"), "--model", tiny_chat_model,
            "--target_model", tiny_chat_model, "--retain_model", tiny_chat_model, "--tokenizer", tiny_chat_model,
            "--data.init_args.source", str(FIX / "muse_books"), "--data.init_args.prefix_words", "8",
            "--data.init_args.continuation_words", "6", "--dtype", "float32", "--max_new_tokens", "16",
            "--relearning.steps", "[1]", "--relearning.batch_size", "2", "--relearning.models", "[model]",
            "--relearning.peft", "[lora]", "--quantization.bits", "[4]",
            "--output_dir", str(tmp_path / "out"), "--tracking_uri", "null"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert "verbmem_forget/rouge_l_f1" in res["attacks"]["quantization"]["settings"]["4bit"]
    halves = res["attacks"]["relearning"]["halves"]
    assert halves["split"] == "verbmem_forget" and halves["group_by"] == "id"
    assert sorted(halves["first"] + halves["second"]) == ["verbmem_forget-0", "verbmem_forget-1"]
    assert "lora/model/steps_1" in res["attacks"]["relearning"]["settings"]


@pytest.mark.slow
def test_rwku_attack_config_on_the_fixture(tiny_chat_model: str, tmp_path: Path) -> None:
    argv = ["attack", "--config", str(CONFIGS / "rwku" / "attack.yaml"), "--model", tiny_chat_model,
            "--tokenizer", tiny_chat_model, "--data.init_args.source", str(FIX / "rwku"),
            "--data.init_args.tokenizer", tiny_chat_model, "--data.init_args.targets", "[Stephen King]",
            "--dtype", "float32", "--max_new_tokens", "8", "--attacks", "[adversarial]",
            "--output_dir", str(tmp_path / "out"), "--tracking_uri", "null"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "attack.json").read_text())
    adv = res["attacks"]["adversarial"]["settings"]
    assert sorted(adv) == ["rwku_affirmative_suffix", "rwku_incontext_learning"]
    assert set(adv["rwku_affirmative_suffix"]) >= {"forget_level3/rouge_l_recall", "forget_level3/refusal_rate"}
    assert "forget_level2/rouge_l_recall" in res["unattacked"]["metrics"]


def test_attack_help_and_usage(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "attack" in usage.splitlines()[0] and any(line.strip().startswith("attack ") for line in usage.splitlines())
    with pytest.raises(SystemExit) as ended:
        main(["attack", "--help"])
    assert ended.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--sampling.ks", "--quantization.backend", "--relearning.steps", "--relearning.group_by",
                 "--adversarial.kinds", "--target_model", "--retain_model", "--output_dir", "--threads"):
        assert flag in text, flag
    assert "Sample counts k of leak@k" in text and "Is it forgotten or only refused?" in text


#: The real benchmark rows beside the checkout (as tests/test_bench_real_data.py); $RERULE_REAL_DATA overrides.
REAL = Path(os.environ.get("RERULE_REAL_DATA", ROOT.parent / "shared" / "real-data"))


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} (real benchmark rows) is absent")
def test_rwku_real_rows_give_every_adversarial_attack_type() -> None:
    from datamodules import RWKUDataModule
    from datamodules.attack_prompts import rwku_attack_items

    dm = RWKUDataModule(source=str(REAL / "rwku"), targets=1, swaps_per_target=1, prompt_format="raw", batch_size=2,
                        eval_splits=["forget_level3"])
    dm.setup("test")
    counts = {k: len(v["forget_level3"]) for k, v in rwku_attack_items(dm).items()}
    assert counts == {"rwku_affirmative_suffix": 2, "rwku_context_hint": 5, "rwku_cross_lingual_french": 1,
                      "rwku_cross_lingual_spanish": 1, "rwku_incontext_learning": 3, "rwku_multiple_choice": 2,
                      "rwku_prefix_injection": 4, "rwku_reverse_query": 3, "rwku_role_play": 4,
                      "rwku_synonym_manipulation": 4}


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} (real benchmark rows) is absent")
def test_tofu_attack_config_on_the_real_rows(tiny_chat_model: str, tmp_path: Path) -> None:
    argv = ["attack", "--config", str(CONFIGS / "tofu" / "attack.yaml"), *_tofu(tiny_chat_model, tmp_path),
            "--data.init_args.source", str(REAL / "tofu"), "--data.init_args.rows_per_author", "20",
            "--data.init_args.eval_max_items", "12", "--quantization.bits", "[4]", "--relearning.peft", "[lora]",
            "--relearning.steps", "[1]"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "attack.json").read_text())
    halves = res["attacks"]["relearning"]["halves"]
    assert halves["first"] and halves["second"] and not set(halves["first"]) & set(halves["second"])
    assert "forget/truth_ratio" in res["attacks"]["quantization"]["settings"]["4bit"]
