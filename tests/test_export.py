"""A shareable export through ``rerule fit``: ``export.merge: true`` writes plain weights, tokenizer and a
generation config with the run's EOS ids, loadable by ``AutoModelForCausalLM.from_pretrained`` alone (no peft);
an adapter export names its base as an absolute path (or the hub id as given); ``export.push_to_hub`` uploads
the directory (the Hub client mocked at its boundary, ``huggingface_hub.HfApi``); the model card has the method,
config, data and the run's evaluation numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rerule_lightning.cli.commands import main
from rerule_lightning.primitives.export import ExportConfig, base_as_given
from tests.test_cli_configs import QUIET, RULE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "configs" / "peft" / "lora.yaml"


class FakeHfApi:
    """Records what would be sent to the Hub."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, **kw: Any) -> None:
        FakeHfApi.calls.append(("create_repo", kw))

    def upload_folder(self, **kw: Any) -> None:
        FakeHfApi.calls.append(("upload_folder", {**kw, "files": sorted(os.listdir(kw["folder_path"]))}))


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A TRL-style reward with variance in every group at temperature 2 (the completions' lengths differ), so the
    adapters get a policy gradient in two steps: the RULE reward can give all-equal groups there, and the KL term
    alone is exactly 0 when the policy and reference passes share their prompt encoding."""
    return [float(len(c)) for c in completions]


def _fit(tiny: dict, tmp: Path, export: Path, *extra: str) -> int:
    links = tiny["links"]
    return main(["fit", "--config", str(RULE), "--config", str(LORA), "--model.init_args.policy.lora_r", "2",
                 "--model.init_args.policy.lora_alpha", "4", "--model.init_args.policy.name_or_path", links["target"],
                 "--data.init_args.world_dir", links["world"], "--data.init_args.batch_size", "4",
                 "--model.init_args.num_generations", "4", "--model.init_args.max_new_tokens", "6",
                 "--model.init_args.temperature", "2.0",
                 "--model.init_args.learning_rate", "0.01", "--model.init_args.export_dir", str(export),
                 "--model.init_args.eval_max_new_tokens", "4", "--data.init_args.eval_max_items", "4",
                 "--data.init_args.eval_splits", "[forget,retain]", "--data.init_args.epoch_length", "2",
                 "--trainer.limit_val_batches", "1", "--trainer.max_steps", "2",
                 "--trainer.default_root_dir", str(tmp / "logs"), *extra, *QUIET])


def test_base_as_given_and_repo_id_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert base_as_given("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert base_as_given("./m") == str(tmp_path / "m") and base_as_given("m") == str(tmp_path / "m")
    with pytest.raises(ValueError, match="export.push_to_hub='nope': expected a Hub repository id"):
        ExportConfig(push_to_hub="nope")


def test_merged_export_loads_alone_and_is_pushed(tiny_prepared: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    FakeHfApi.calls.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    export = tmp_path / "export"
    assert _fit(tiny_prepared, tmp_path, export, "--model.init_args.export.merge", "true",
                "--model.init_args.export.push_to_hub", "someone/rule-tiny",
                "--model.init_args.stop_token_ids", "[7]",
                "--model.init_args.reward", "test_export:length_reward") == 0
    assert (export / "model.safetensors").is_file() and not (export / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(export))  # plain weights: no peft involved
    assert not hasattr(model, "peft_config")
    tok = AutoTokenizer.from_pretrained(str(export))
    gc = GenerationConfig.from_pretrained(str(export))
    assert gc.eos_token_id == [tok.eos_token_id, 7]
    # merged == base + trained adapters (kept in export/adapter, base recorded as an absolute path)
    adapter_cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == os.path.abspath(tiny_prepared["links"]["target"])
    from peft import PeftModel
    from safetensors.torch import load_file

    trained = load_file(str(export / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k), "the adapters never moved"
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_prepared["links"]["target"]),
                                             str(export / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_prepared["links"]["target"])
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        merged_logits = model(input_ids=ids).logits
        torch.testing.assert_close(merged_logits, with_adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert (merged_logits - base(input_ids=ids).logits).abs().max() > 1e-6
    card = (export / "README.md").read_text()
    assert "RULE (refusal-boundary GRPO)" in card and "final export" in card and "ForgetRetainDataModule" in card
    assert "| forget/refusal_rate |" in card and '"learning_rate": 0.01' in card
    assert [c[0] for c in FakeHfApi.calls] == ["create_repo", "upload_folder"]
    assert FakeHfApi.calls[0][1]["repo_id"] == "someone/rule-tiny" and FakeHfApi.calls[0][1]["private"] is True
    assert {"README.md", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(
        FakeHfApi.calls[1][1]["files"])


def test_adapter_export_moves(tiny_prepared: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    export = tmp_path / "export"
    assert _fit(tiny_prepared, tmp_path, export) == 0
    cfg = json.loads((export / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(tiny_prepared["links"]["target"])
    moved = tmp_path / "elsewhere" / "rule"
    moved.parent.mkdir()
    export.rename(moved)
    monkeypatch.chdir(moved.parent)
    model = AutoModelForCausalLM.from_pretrained(str(moved))  # base + adapters, from any working directory
    assert hasattr(model, "peft_config")
