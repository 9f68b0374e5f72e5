"""The model axis: ``configs/models/<name>.yaml`` on a TOFU stage config is the whole model switch (the RULE stage;
``configs/models/rs/`` and ``configs/models/eval/`` hold the same switch for the other two stages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rerule_lightning.cli.commands import lightning_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
FIXTURE = ROOT / "tests" / "fixtures" / "tofu"
STAGES = {"rule": ("fit", MODELS), "rs": ("fit", MODELS / "rs"), "eval": ("test", MODELS / "eval")}
NAMES = ("llama-3.1-8b-instruct", "llama-3.2-1b-instruct", "tiny-embedded")


def _dump(cli) -> str:
    return cli.parser.dump(cli.config, skip_check=True)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_every_model(stage: str) -> None:
    assert {p.stem for p in STAGES[stage][1].glob("*.yaml")} == set(NAMES)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_8b_file_is_the_whole_switch(stage: str, no_weight_loading: None, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sub, folder = STAGES[stage]
    base = ROOT / "configs" / "tofu" / f"{stage}.yaml"
    cli = lightning_main([sub, "--config", str(base), "--config", str(folder / "llama-3.1-8b-instruct.yaml"),
                          "--trainer.logger", "false"], run=False)
    text = _dump(cli)
    assert "Llama-3.2-1B" not in text, "a 1B id survived the model switch"
    assert "tofu_Llama-3.1-8B-Instruct" in text
    assert cli.datamodule.hparams.tokenizer == "open-unlearning/tofu_Llama-3.1-8B-Instruct_full"
    cfg = cli.model.policy_cfg
    if stage == "rule":
        assert (cfg.peft, cfg.dtype, cli.model.hparams.learning_rate) == ("qlora", "bfloat16", 2e-5)
        assert cfg.name_or_path == ".cache/rerule/runs/tofu/llama-3.1-8b-instruct/rs"  # the RS stage's export
        assert cli.model.hparams.eval_reference == "open-unlearning/tofu_Llama-3.1-8B-Instruct_retain90"
    elif stage == "rs":
        assert (cfg.peft, cli.model.hparams.learning_rate) == ("qlora", 1e-5)
        assert cli.model.hparams.export_dir == ".cache/rerule/runs/tofu/llama-3.1-8b-instruct/rs"
    else:
        assert cfg.name_or_path == "open-unlearning/tofu_Llama-3.1-8B-Instruct_full"


def test_1b_file_reproduces_the_shipped_defaults(no_weight_loading: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for stage, (sub, folder) in STAGES.items():
        base = ["--config", str(ROOT / "configs" / "tofu" / f"{stage}.yaml"), "--trainer.logger", "false"]
        plain = lightning_main([sub, *base], run=False)
        switched = lightning_main([sub, *base, "--config", str(folder / "llama-3.2-1b-instruct.yaml")], run=False)
        assert _dump(plain) == _dump(switched), stage


@pytest.mark.slow
def test_tiny_model_file_runs_a_tofu_shaped_rule_stage(tiny_chat_model: str, tmp_path: Path) -> None:
    cli = lightning_main(["fit", "--config", str(ROOT / "configs" / "tofu" / "rule.yaml"),
                          "--config", str(MODELS / "tiny-embedded.yaml"),
                          "--model.init_args.policy.name_or_path", tiny_chat_model,
                          "--model.init_args.eval_reference", "null", "--model.init_args.num_generations", "2",
                          "--model.init_args.export_dir", str(tmp_path / "export"),
                          "--data.init_args.source", str(FIXTURE), "--data.init_args.tokenizer", tiny_chat_model,
                          "--data.init_args.rows_per_author", "3", "--data.init_args.batch_size", "2",
                          "--trainer.max_steps", "2", "--trainer.logger", "false",
                          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                          "--trainer.default_root_dir", str(tmp_path / "logs")])
    assert cli.trainer.global_step == 2 and cli.model.policy_cfg.peft == "full"
    assert not cli.datamodule.pool[0]["prompt"].startswith("System:")  # raw prompts: no chat template
    assert (tmp_path / "export" / "model.safetensors").exists()
