"""Precision that trains: every trainable parameter is float32 (full fine-tuning: float32 master weights under
``trainer.precision: bf16-mixed``; (Q)LoRA adapters in float32), and a bf16 / fp16 trainable parameter with no
float32 master copy is refused before training with one line naming the setting."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rerule_lightning.cli.commands import main
from rerule_lightning.primitives.policy import PolicyConfig, build_policy, master_weight_error
from tests.test_cli_configs import QUIET, RS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _bf16_copy(tiny_prepared: dict, tmp_path: Path) -> str:
    """The tiny target with bf16 weights on disk (what a published bf16 checkpoint looks like)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    shutil.copytree(os.path.realpath(tiny_prepared["links"]["target"]), out)
    AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).save_pretrained(str(out))
    return str(out)


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_pure_bf16_adamw_drops_most_updates() -> None:
    """Why the refusal exists (the issue's probe): 10 AdamW steps at lr 1e-5 on bf16 weights ~N(0, 0.02) leave
    most of them bit-identical; float32 master weights move every one."""
    torch.manual_seed(0)
    init = torch.randn(4096) * 0.02
    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.nn.Parameter(init.to(dtype).clone())
        opt = torch.optim.AdamW([w], lr=1e-5, weight_decay=0.0)
        for _ in range(10):
            w.grad = torch.randn_like(w)
            opt.step()
        moved[dtype] = (w.detach() != init.to(dtype)).float().mean().item()
    assert moved[torch.bfloat16] < 0.5 and moved[torch.float32] == 1.0


def test_master_weight_rule() -> None:
    assert "policy.dtype=bfloat16 with policy.peft=full" in master_weight_error(PolicyConfig(dtype="bfloat16"))
    assert master_weight_error(PolicyConfig(dtype="float32")) is None
    assert master_weight_error(PolicyConfig(peft="lora", dtype="bfloat16")) is None  # adapters are float32
    assert "--trainer.precision=bf16-true" in master_weight_error(PolicyConfig(), "bf16-true")
    assert master_weight_error(PolicyConfig(), "bf16-mixed") is None
    with pytest.raises(ValueError, match="no float32 master copy"):
        build_policy(PolicyConfig(name_or_path="/nonexistent/never/loaded", dtype="float16"))


def test_lora_adapters_are_float32_over_a_bf16_base(tiny_prepared: dict) -> None:
    model = build_policy(PolicyConfig(name_or_path=tiny_prepared["links"]["target"], peft="lora", dtype="bfloat16",
                                      lora_r=2, lora_alpha=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)


@pytest.mark.parametrize(("flags", "message"), [
    (["--model.init_args.policy.dtype", "bfloat16"], "policy.dtype=bfloat16 with policy.peft=full"),
    (["--trainer.precision", "bf16-true"], "--trainer.precision=bf16-true casts the trainable weights"),
])
def test_half_trainable_weights_refused_before_training(tiny_prepared: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture, flags: list[str],
                                                        message: str) -> None:
    links = tiny_prepared["links"]
    rc = main(["fit", "--config", str(RS), "--model.init_args.policy.name_or_path", links["target"],
               "--data.init_args.world_dir", links["world"], "--data.init_args.tokenizer", links["tokenizer"],
               "--model.init_args.export_dir", str(tmp_path / "out"), "--trainer.max_steps", "1",
               "--trainer.default_root_dir", str(tmp_path / "logs"), *flags, *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("rerule: error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_shipped_real_settings_move_99_percent_of_a_bf16_model(tiny_prepared: dict, tmp_path: Path) -> None:
    """configs/tofu/rs.yaml's precision settings (policy dtype, trainer precision, lr 1e-5, schedule, gradient
    accumulation) on the tiny model stored in bf16: 10 optimizer steps change >= 99 % of its trainable weights."""
    shipped = yaml.safe_load((CONFIGS / "tofu" / "rs.yaml").read_text())
    m, pol = shipped["model"]["init_args"], shipped["model"]["init_args"]["policy"]
    assert m["learning_rate"] == 1e-5 and pol["peft"] == "full"
    start = _bf16_copy(tiny_prepared, tmp_path)
    links = tiny_prepared["links"]
    out = tmp_path / "out"
    rc = main(["fit", "--config", str(RS), "--model.init_args.policy.name_or_path", start,
               "--model.init_args.policy.dtype", pol["dtype"], "--trainer.precision", shipped["trainer"]["precision"],
               "--trainer.accumulate_grad_batches", str(shipped["trainer"]["accumulate_grad_batches"]),
               "--model.init_args.learning_rate", str(m["learning_rate"]),
               "--model.init_args.weight_decay", str(m["weight_decay"]),
               "--model.init_args.warmup_steps", str(m["warmup_steps"]), "--model.init_args.scheduler", m["scheduler"],
               "--data.init_args.world_dir", links["world"], "--data.init_args.tokenizer", links["tokenizer"],
               "--model.init_args.export_dir", str(out), "--trainer.max_steps", "10", "--trainer.max_epochs", "-1",
               "--trainer.default_root_dir", str(tmp_path / "logs"), *QUIET])
    assert rc == 0
    before, after = _weights(start), _weights(str(out))
    assert all(v.dtype == torch.bfloat16 for v in before.values())
    assert all(after[k].dtype == torch.float32 for k in before)  # the export holds the float32 master weights
    changed = sum(int((after[k] != before[k].float()).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    print(f"moved {changed}/{total} = {changed / total:.4%}")
    assert changed / total >= 0.99, f"only {changed / total:.3%} of the weights moved"
