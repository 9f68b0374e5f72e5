"""UnlearningEvaluator on the tiny prepared world: teacher-forced NLL, target vs retain metrics, the reference
cache, eval.json, and ``rerule test`` / GRPO validation through Lightning."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules.forget_retain import EVAL_SPLITS, ForgetRetainDataModule
from rerule_lightning.evaluation.evaluator import METRIC_NAMES, UnlearningEvaluator, teacher_forced_stats
from rerule_lightning.modules.eval_hooks import compute_reference, evaluate_items

REPO = Path(__file__).resolve().parents[1]
CROSS_KEYS = ("forget/forget_quality", "forget/mia_auc", "forget/privleak", "utility/model_utility")


def _load(path: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def evaluated(tiny_prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny target and retain models evaluated on every split against the retain reference."""
    links = tiny_prepared["links"]
    dm = ForgetRetainDataModule(world_dir=links["world"], eval_splits=list(EVAL_SPLITS))
    dm.setup("test")
    cache = str(tmp_path_factory.mktemp("eval") / "reference.json")
    ref = compute_reference(links["retain"], dm.reference_items(), cache)
    out = {"dm": dm, "ref": ref, "cache": cache}
    for name in ("target", "retain"):
        model, tok = _load(links[name])
        ev = UnlearningEvaluator(dm.eval_splits, retain_reference=ref, max_new_tokens=24)
        evaluate_items(ev, model, tok, dm.eval_items)
        out[name] = (ev, ev.compute())
    return out


def test_teacher_forced_nll_matches_cross_entropy(tiny_prepared: dict) -> None:
    model, tok = _load(tiny_prepared["links"]["target"])
    prompt, answer = "Question: Which river flows through Valparaiso?\nAnswer:", "The river is the Brisk."
    p_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]  # answer tokens only: no eos counted
    ids = torch.tensor([p_ids + a_ids])  # [1, P + A]
    with torch.no_grad():
        logits = model(ids).logits[0]  # [P + A, V]
    direct = F.cross_entropy(logits[len(p_ids) - 1:-1], ids[0, len(p_ids):])  # mean over the A answer tokens
    # batched with longer / shorter neighbours (left padding must not change the item's value)
    prompts = [prompt, "Question: Who?\nAnswer:", prompt + " Be precise."]
    answers = [answer, "A much longer answer with several more tokens than the first one.", "x"]
    st = teacher_forced_stats(model, tok, prompts, answers, batch_size=3)
    assert st["nll_mean"].shape == (3,) and st["token_logprobs"].shape == st["mask"].shape
    assert int(st["mask"][0].sum()) == len(a_ids)
    assert st["target_ids"][0, :len(a_ids)].tolist() == a_ids
    assert float(st["nll_mean"][0]) == pytest.approx(float(direct), abs=1e-5)
    lp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1).gather(1, ids[0, len(p_ids):, None])[:, 0]  # [A]
    torch.testing.assert_close(st["token_logprobs"][0, :len(a_ids)], lp, atol=1e-5, rtol=0)
    assert st["pred_ids"][0, :len(a_ids)].tolist() == logits[len(p_ids) - 1:-1].argmax(-1).tolist()
    # one item at a time gives the same numbers
    single = teacher_forced_stats(model, tok, prompts[1:2], answers[1:2], batch_size=1)
    assert float(single["nll_mean"][0]) == pytest.approx(float(st["nll_mean"][1]), abs=1e-5)
    with_eos = teacher_forced_stats(model, tok, [prompt], [answer], include_eos=True)
    assert int(with_eos["mask"][0].sum()) == len(a_ids) + 1


def test_target_knows_forget_set(evaluated: dict) -> None:
    _, v = evaluated["target"]
    assert v["forget/answer_accuracy"] >= 0.95
    assert v["forget/refusal_rate"] == 0.0
    assert v["forget/mia_auc"] > 0.9  # the forget set looks memorised next to the holdout authors
    assert v["forget/privleak"] < 0


def test_forget_quality_target_below_retain(evaluated: dict) -> None:
    fq_retain = evaluated["retain"][1]["forget/forget_quality"]
    fq_target = evaluated["target"][1]["forget/forget_quality"]
    assert fq_retain == pytest.approx(1.0)  # KS of identical samples
    assert fq_target < fq_retain
    assert evaluated["retain"][1]["forget/privleak"] == pytest.approx(0.0, abs=1e-9)


def test_reference_is_cached(evaluated: dict, tiny_prepared: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import rerule_lightning.primitives.policy as policy

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached reference must not load the model again")

    monkeypatch.setattr(policy, "load_base_model", fail)
    links = tiny_prepared["links"]
    again = compute_reference(links["retain"], evaluated["dm"].reference_items(), evaluated["cache"])
    assert again == evaluated["ref"]
    assert len(again["forget_truth_ratios"]) == len(evaluated["dm"].eval_items["forget"])


def test_report_has_items_and_every_aggregate(evaluated: dict, tmp_path: Path) -> None:
    ev, values = evaluated["target"]
    expected = {f"{s}/{m}" for s in EVAL_SPLITS for m in METRIC_NAMES} | set(CROSS_KEYS)
    assert set(values) == expected
    assert all(re.fullmatch(r"[a-z0-9_/.]+", k) for k in values)
    path = tmp_path / "out" / "eval.json"
    ev.write_report(str(path), extra={"model": {"name_or_path": "target"}, "config_hash": "abc"})
    report = json.loads(path.read_text())
    assert report["config_hash"] == "abc" and report["model"]["name_or_path"] == "target"
    assert set(report["aggregate"]) == expected
    for k, v in values.items():
        assert report["aggregate"][k] == (None if math.isnan(v) else pytest.approx(v))
    n_items = sum(len(evaluated["dm"].eval_items[s]) for s in EVAL_SPLITS)
    assert len(report["per_item"]) == n_items == sum(report["num_items"].values())
    row = report["per_item"][0]
    for key in ("id", "split", "prediction", "refusal", "correct", "rouge_l_recall", "probability",
                "truth_ratio", "min_k", "extraction_strength", "nll"):
        assert key in row
    ev_copy = UnlearningEvaluator(["forget"])
    ev_copy.reset()
    assert ev_copy.per_item() == []


def test_rerule_test_cli_writes_report(tiny_prepared: dict, tmp_path: Path) -> None:
    from rerule_lightning.cli.commands import main

    links = tiny_prepared["links"]
    report = tmp_path / "eval.json"
    main(["test", "--config", str(REPO / "configs/embedded/eval.yaml"),
          "--model.init_args.policy.name_or_path", links["target"],
          "--model.init_args.eval_reference", links["retain"],
          "--model.init_args.eval_report_path", str(report),
          "--model.init_args.eval_max_new_tokens", "24",
          "--data.init_args.world_dir", links["world"],
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path / "logs")])
    r = json.loads(report.read_text())
    assert r["aggregate"]["forget/answer_accuracy"] >= 0.95
    assert r["aggregate"]["forget/forget_quality"] < 1.0
    assert r["per_item"] and r["splits"] == list(EVAL_SPLITS)
    assert r["model"]["name_or_path"] == links["target"] and len(r["config_hash"]) == 16
    assert r["data"]["world_config"] is not None


def test_grpo_module_validation_logs_metrics(tiny_prepared: dict) -> None:
    import lightning as L

    from rerule_lightning.modules.grpo import GRPOUnlearningModule
    from rerule_lightning.primitives.policy import PolicyConfig

    links = tiny_prepared["links"]
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=links["target"]), beta=0.0,
                                  eval_reference=links["retain"], eval_max_new_tokens=16)
    dm = ForgetRetainDataModule(world_dir=links["world"], eval_splits=["forget", "retain", "holdout"],
                                eval_max_items=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]  # epoch-end logs: on every loader
    for key in ("forget/refusal_rate", "forget/forget_quality", "forget/privleak", "utility/model_utility"):
        assert key in metrics
    assert module.evaluator.per_item() == []  # reset after the epoch
