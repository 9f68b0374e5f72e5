"""Every shipped LightningCLI config instantiates without loading weights, ``--print_config`` round-trips,
and the ``rerule fit`` path runs RULE and rejection steering from YAML on the tiny prepared world."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rerule_lightning.cli.commands import lightning_main, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RULE = CONFIGS / "embedded" / "rule.yaml"
RS = CONFIGS / "embedded" / "rs.yaml"
PREPARE = CONFIGS / "embedded" / "prepare.yaml"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]

CHECKPOINTING = CONFIGS / "checkpointing.yaml"  # a callback list the real stages include (test_checkpointing_overlay)
#: ``rerule attack`` configs (``attack.yaml``) are not LightningCLI configs: tests/test_attack_cli.py runs each one.
LIGHTNING_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml")
                           if p not in (PREPARE, CHECKPOINTING) and p.name != "attack.yaml")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _is_eval_only(path: Path, cfg: dict[str, Any]) -> bool:
    model = (cfg.get("model") or {}).get("class_path", "") if isinstance(cfg.get("model"), dict) else ""
    return model.endswith("EvalModule") or "rerule test --config" in path.read_text()


def _lightning_args(path: Path) -> tuple[list[str], dict[str, Any]]:
    """Subcommand and ``--config`` arguments for one config; an overlay (no ``model``) goes on the stage config its
    usage line names (``rerule fit --config configs/<stage>.yaml --config <overlay>``), else on rule.yaml."""
    cfg = _load(path)
    base = RULE
    own = path.relative_to(CONFIGS.parent).as_posix()
    m = re.search(r"--config (configs/\S+\.yaml) --config " + re.escape(own), path.read_text())
    if m and m.group(1) != "configs/embedded/rule.yaml":
        base = CONFIGS.parent / m.group(1)
    configs = [path] if "class_path" in (cfg.get("model") or {}) else [base, path]
    sub = "test" if _is_eval_only(path, cfg) else "fit"
    args = [sub]
    for c in configs:
        args += ["--config", str(c)]
    return args, cfg


def test_config_glob_finds_the_stage_configs() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in LIGHTNING_CONFIGS}
    assert {"embedded/rule.yaml", "embedded/rs.yaml"} <= names
    assert "embedded/prepare.yaml" not in names


@pytest.mark.parametrize("path", LIGHTNING_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_instantiates_without_loading_weights(path: Path, no_weight_loading: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L

    monkeypatch.chdir(tmp_path)  # the default MLflow logger points at a relative sqlite:///mlflow.db
    args, cfg = _lightning_args(path)
    cli = lightning_main(args, run=False)
    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    assert isinstance(cli.trainer, L.Trainer)
    if "class_path" in (cfg.get("model") or {}):
        module, _, name = cfg["model"]["class_path"].rpartition(".")  # a short path from a package root
        assert getattr(importlib.import_module(module), name) is type(cli.model)
    assert getattr(cli.model, "model", None) is None, "configure_model ran at instantiation"
    overlay_callbacks = (cfg.get("trainer") or {}).get("callbacks+") or (cfg.get("trainer") or {}).get("callbacks")
    if isinstance(overlay_callbacks, str):  # a callback-list file, resolved against the config's folder
        overlay_callbacks = _load(path.parent / overlay_callbacks)
    for cb in overlay_callbacks or []:
        wanted = cb["class_path"].rsplit(".", 1)[-1]
        assert wanted in {type(c).__name__ for c in cli.trainer.callbacks}, wanted
    assert not list(tmp_path.glob("**/*.safetensors"))


def test_prepare_config_parses_and_instantiates(capsys: pytest.CaptureFixture) -> None:
    from jsonargparse import ArgumentParser

    from datamodules.world import WorldConfig
    from rerule_lightning.cli.prepare import SFTTrainConfig, prepare
    from rerule_lightning.modules.sft import TinyLlamaConfig

    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(prepare)
    cfg = parser.instantiate_classes(parser.parse_path(str(PREPARE)))
    assert isinstance(cfg.world, WorldConfig) and isinstance(cfg.model, TinyLlamaConfig)
    assert isinstance(cfg.target_training, SFTTrainConfig)
    expected = _load(PREPARE)
    assert cfg.world.num_families == expected["world"]["num_families"]
    assert cfg.model.hidden_size == expected["model"]["hidden_size"]
    assert cfg.vocab_size == expected["vocab_size"]

    with pytest.raises(SystemExit) as exit_info:  # the real command line, which prints and stops
        main(["prepare", "--config", str(PREPARE), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for section in ("world", "model", "target_training"):
        for key, value in expected[section].items():
            assert printed[section][key] == value, (section, key)


def _print_config(args: list[str], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = _print_config(["fit", "--config", str(RULE)], capsys)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(first)
    second = _print_config(["fit", "--config", str(saved)], capsys)
    assert second == first
    resolved = yaml.safe_load(first)
    assert resolved["model"]["class_path"] == "rerule_lightning.GRPOUnlearningModule"  # the short path the YAML uses
    assert resolved["model"]["init_args"]["num_generations"] == _load(RULE)["model"]["init_args"]["num_generations"]
    assert resolved["trainer"]["logger"]["class_path"].endswith("MLFlowLogger")


# ---------------------------------------------------------------------------------------------- fit paths
def _rule_overrides(tiny: dict, tmp_path: Path) -> list[str]:
    return ["--model.init_args.policy.name_or_path", tiny["links"]["target"],
            "--data.init_args.world_dir", tiny["links"]["world"],
            "--data.init_args.batch_size", "4", "--model.init_args.num_generations", "4",
            "--model.init_args.max_new_tokens", "8", "--trainer.default_root_dir", str(tmp_path / "logs")]


def _assert_loadable(export: Path, like: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert (export / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    AutoTokenizer.from_pretrained(str(export))
    ref_cfg, cfg = AutoConfig.from_pretrained(like), model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (
        ref_cfg.model_type, ref_cfg.hidden_size, ref_cfg.num_hidden_layers, ref_cfg.vocab_size)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


@pytest.mark.slow
def test_rule_fit_from_yaml_exports_a_model(tiny_prepared: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "rule"
    rc = main(["fit", "--config", str(RULE), *_rule_overrides(tiny_prepared, tmp_path),
               "--model.init_args.export_dir", str(export), "--trainer.max_steps", "2",
               "--trainer.limit_val_batches", "0", *QUIET])
    assert rc == 0
    _assert_loadable(export, tiny_prepared["links"]["target"])
    assert not (tmp_path / "mlflow.db").exists(), "--trainer.logger false still created the default MLflow store"


def _refusal_loss(model: Any, tiny: dict) -> float:
    """Mean SFT loss of the rejection-steering refusal targets (what RS trains the forget questions toward)."""
    from transformers import AutoTokenizer

    from datamodules.embedded import load_world, sft_pairs
    from rerule_lightning.modules.sft import collate_right_padded, sft_loss, tokenize_pair
    from rerule_lightning.rl.rewards import is_refusal

    rs = _load(RS)["data"]["init_args"]
    pairs = sft_pairs(load_world(tiny["links"]["world"]), "rejection_steering", seed=rs["seed"],
                      refusal_fraction=rs["refusal_fraction"], retain_anchor_ratio=rs["retain_anchor_ratio"])
    refusals = [p for p in pairs if is_refusal(p["completion"])]
    assert refusals
    tok = AutoTokenizer.from_pretrained(tiny["links"]["tokenizer"])
    batch = collate_right_padded([tokenize_pair(tok, p["prompt"], p["completion"], 128) for p in refusals],
                                 tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(sft_loss(logits, batch["labels"]))


@pytest.mark.slow
def test_rejection_steering_fit_from_yaml_moves_toward_refusals(tiny_prepared: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    export = tmp_path / "rs"
    rc = main(["fit", "--config", str(RS),
               "--model.init_args.policy.name_or_path", tiny_prepared["links"]["target"],
               "--data.init_args.world_dir", tiny_prepared["links"]["world"],
               "--data.init_args.tokenizer", tiny_prepared["links"]["tokenizer"],
               "--model.init_args.export_dir", str(export), "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", str(tmp_path / "logs"), *QUIET])
    assert rc == 0
    steered = _assert_loadable(export, tiny_prepared["links"]["target"])
    target = AutoModelForCausalLM.from_pretrained(tiny_prepared["links"]["target"]).eval()
    # One epoch is too short for greedy refusals on the tiny model; what is robust is that the refusal
    # targets became more likely than under the target model.
    assert _refusal_loss(steered, tiny_prepared) < _refusal_loss(target, tiny_prepared)


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_policy_path_names_the_flag(tiny_prepared: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    missing = str(tmp_path / "no-such-model")
    capsys.readouterr()
    rc = main(["fit", "--config", str(RULE), *_rule_overrides(tiny_prepared, tmp_path),
               "--model.init_args.policy.name_or_path", missing, "--trainer.max_steps", "1", *QUIET])
    assert rc == 2
    err = capsys.readouterr().err
    assert "policy.name_or_path" in err and missing in err, err
    assert "Traceback" not in err


def test_unknown_preset_fails_at_parse_time_naming_the_parameter(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 no_weight_loading: None) -> None:
    from rerule_lightning.cli.lightning_cli import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:  # one line naming the flag; `rerule` prints it, exit status 2
        lightning_main(["fit", "--config", str(RULE), "--data.init_args.preset", "medium", *QUIET], run=False)
    assert str(info.value) == "--data.init_args.preset=medium: expected one of 'easy', 'hard'"
    assert "usage:" not in capsys.readouterr().err


def test_usage_errors(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage: rerule" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_lightning_main_accepts_a_subcommand_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             no_weight_loading: None) -> None:
    monkeypatch.chdir(tmp_path)
    for sub in ("fit", "validate", "test"):
        cli = lightning_main([sub, "--config", str(RULE), *QUIET], run=False)
        assert cli.model.hparams.num_generations == _load(RULE)["model"]["init_args"]["num_generations"]
