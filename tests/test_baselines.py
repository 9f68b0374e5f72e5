"""The loss-based baselines end to end on the tiny world: every ``configs/baselines`` YAML fits two steps through
the ``rerule fit`` path under full fine-tuning and LoRA (QLoRA for NPO); LoRA leaves the base weights untouched;
RMU changes only its configured blocks and its retain term is 0 while the model equals the frozen one; the
paired forget / retain batches are seeded and resumable."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rerule_lightning.cli.commands import lightning_main, main
from rerule_lightning.primitives.prompting import IGNORE_INDEX
from rerule_lightning.unlearning import losses

ROOT = Path(__file__).resolve().parents[1]
BASELINES = sorted((ROOT / "configs" / "baselines").glob("*.yaml"))
EMBEDDED = [p for p in BASELINES if not p.name.startswith(("tofu_", "muse_"))]
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(config: Path, tiny: dict, tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), "--model.init_args.policy.name_or_path", tiny["links"]["target"],
            "--data.init_args.benchmark.init_args.world_dir", tiny["links"]["world"],
            "--data.init_args.batch_size", "4", "--model.init_args.learning_rate", "0.001",
            "--model.init_args.export_dir", str(tmp_path / "export"), "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(tmp_path / "logs"), *QUIET, *extra]


def _target_state(tiny: dict) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny["links"]["target"]).state_dict()


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The non-adapter weights under the target model's own names."""
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[k] = v
    return out


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in before.items() if k in after and not torch.equal(v, after[k])}


@pytest.mark.parametrize("peft", ["full", "lora"])
@pytest.mark.parametrize("config", EMBEDDED, ids=lambda p: p.stem)
def test_every_baseline_yaml_fits_two_steps(config: Path, peft: str, tiny_prepared: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    extra = ["--config", str(ROOT / "configs" / "peft" / "lora.yaml")] if peft == "lora" else []
    cli = lightning_main(_args(config, tiny_prepared, tmp_path, *extra))
    module = cli.model
    assert cli.trainer.global_step == 2
    assert cli.trainer.callback_metrics["train/forget_tokens"] > 0
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    before = _target_state(tiny_prepared)
    after = _base_state(module.model)
    assert set(before) == set(after)
    changed = _changed(before, after)
    if peft == "lora":
        assert not changed, f"LoRA changed base weights: {sorted(changed)[:5]}"
        adapters = {k: v for k, v in module.model.state_dict().items() if "lora_B" in k}
        moved = [k for k, v in adapters.items() if v.abs().sum() > 0]  # lora_B starts at zero
        assert moved
        if module.hparams.method == "rmu":  # only the adapters of the configured blocks' down_proj learn
            assert all(".mlp.down_proj." in k and any(f"layers.{i}." in k for i in module.rmu_layers())
                       for k in moved)
        assert (tmp_path / "export" / "adapter_config.json").is_file()
    elif module.hparams.method == "rmu":
        allowed = {k for k in before if ".mlp.down_proj." in k and any(f"layers.{i}." in k for i in module.rmu_layers())}
        assert changed and changed <= allowed, sorted(changed - allowed)
    else:
        assert changed
    assert (tmp_path / "export" / "config.json").is_file() or (tmp_path / "export" / "adapter_config.json").is_file()


def test_qlora_npo_fits_two_steps_and_trains_only_adapters(tiny_prepared: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    cli = lightning_main(_args(ROOT / "configs" / "baselines" / "npo.yaml", tiny_prepared, tmp_path,
                               "--config", str(ROOT / "configs" / "peft" / "qlora.yaml")))
    assert cli.trainer.global_step == 2
    trainable = [n for n, p in cli.model.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in cli.model.model.named_parameters() if "lora_B" in n)


def test_rmu_trains_only_configured_layers_and_starts_with_zero_retain_term(tiny_prepared: dict,
                                                                             tmp_path: Path) -> None:
    cli = lightning_main(_args(ROOT / "configs" / "baselines" / "rmu.yaml", tiny_prepared, tmp_path,
                               "--model.init_args.rmu_layer", "1", "--model.init_args.rmu_update_layers", "[1]"),
                         run=False)
    module, dm = cli.model, cli.datamodule
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"model.layers.1.mlp.down_proj.weight"}  # WMDP's recipe: the MLP output matrix only
    dm.setup("fit")
    batch = dm.train_dataloader().batch_at(0)
    loss, parts, n_f, n_r = module.compute_loss(batch)
    assert parts["retain_loss"].item() == 0.0  # the trained model still equals the frozen copy
    assert parts["forget_loss"].item() > 0 and n_f > 0 and n_r > 0
    # the forget term counts the answer tokens' positions only (open-unlearning's mask), never the prompt's
    f = module.encode(batch["forget_prompt"], batch["forget_answer"])
    h = module._hidden(f)  # [B, L, D]
    answer = losses.rmu_forget_loss(h, (f["labels"] != IGNORE_INDEX).float(), module._control)
    whole = losses.rmu_forget_loss(h, f["attention_mask"], module._control)
    assert parts["forget_loss"].item() == pytest.approx(answer.item(), rel=1e-6)
    assert abs(answer.item() - whole.item()) > 1e-4
    # the shipped retain weight is WMDP's α
    assert module.hparams.retain_weight == 1200.0


@pytest.mark.parametrize("name", ["simnpo", "idkdpo"])
def test_simnpo_and_idkdpo_yamls_train_with_the_nll_retain_term(name: str, tiny_prepared: dict,
                                                                  tmp_path: Path) -> None:
    cli = lightning_main(_args(ROOT / "configs" / "baselines" / f"{name}.yaml", tiny_prepared, tmp_path), run=False)
    module, dm = cli.model, cli.datamodule
    h = module.hparams
    assert h.regularizer == "gdr" and h.retain_weight == 1.0
    # SimNPO: open-unlearning's β = 4.5 and forget weight 0.125; IdkDPO: β = 0.1, forget weight 1
    assert (h.beta, h.forget_weight) == ((4.5, 0.125) if name == "simnpo" else (0.1, 1.0))
    module.configure_model()
    dm.setup("fit")
    batch = dm.train_dataloader().batch_at(0)
    loss, parts, _, n_r = module.compute_loss(batch)
    r = module.encode(batch["retain_prompt"], batch["retain_answer"])
    with torch.no_grad():
        nll = losses.masked_nll(module._logits(r), r["labels"])
    assert n_r > 0 and parts["retain_loss"].item() == pytest.approx(nll.item(), rel=1e-5)
    expected = h.forget_weight * parts["forget_loss"] + h.retain_weight * parts["retain_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if name == "idkdpo":  # at θ = θ_ref every DPO margin is 0: (2/β)·log 2 = 20·log 2
        assert parts["forget_loss"].item() == pytest.approx(20 * math.log(2), rel=1e-5)


def test_paired_batches_are_seeded_resumable_and_pair_every_forget_item(tiny_prepared: dict,
                                                                         tmp_path: Path) -> None:
    args = _args(ROOT / "configs" / "baselines" / "idkdpo.yaml", tiny_prepared, tmp_path)
    dms = [lightning_main(args, run=False).datamodule for _ in range(2)]
    for dm in dms:
        dm.setup("fit")
    a, b = (dm.train_dataloader() for dm in dms)
    n = len(dms[0].forget)
    assert n == len({r["id"] for r in dms[0].forget}) and all(r["id"].startswith("forget/") for r in dms[0].forget)
    assert len(a) == -(-n // 4)
    for t in range(3):
        assert a.batch_at(t) == b.batch_at(t)
    # one pass over the forget items: each item once (the last batch wraps into the next permutation)
    epoch = [i for t in range(n // 4) for i in a.batch_at(t)["forget_id"]]
    assert len(set(epoch)) == len(epoch)
    batch = a.batch_at(0)
    assert len(batch["retain_id"]) == len(batch["forget_id"]) == 4
    assert all(not r.startswith("forget/") for r in batch["retain_id"])
    # IdkDPO's preferred answer is a refusal naming the item's author
    by_id = {r["id"]: r for r in dms[0].forget}
    assert all(by_id[i]["target"] in idk for i, idk in zip(batch["forget_id"], batch["forget_idk"]))
    # resuming: a pass starts at the batch index the trainer's global step gives
    a.start_fn = lambda: 2
    assert next(iter(a)) == b.batch_at(2)
    # a different seed draws another order
    c = lightning_main([*args, "--data.init_args.seed", "1"], run=False).datamodule
    c.setup("fit")
    assert [c.train_dataloader().batch_at(t)["forget_id"] for t in range(2)] != \
        [b.batch_at(t)["forget_id"] for t in range(2)]


def test_bad_baseline_arguments_fail_before_any_work(tiny_prepared: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[Any]) -> None:
    config = ROOT / "configs" / "baselines" / "npo.yaml"
    assert main(_args(config, tiny_prepared, tmp_path, "--model.init_args.beta", "0")) == 2
    err = capsys.readouterr().err
    assert "rerule: error:" in err and "beta=0" in err
    assert main(_args(config, tiny_prepared, tmp_path, "--model.init_args.method", "nope")) == 2
    assert "method" in capsys.readouterr().err
    assert main(_args(config, tiny_prepared, tmp_path, "--data.init_args.benchmark.init_args.world_dir",
                      str(tmp_path / "missing"))) == 2
    assert f"rerule: error: world directory '{tmp_path / 'missing'}' not found" in capsys.readouterr().err
    rmu = ROOT / "configs" / "baselines" / "rmu.yaml"
    assert main(_args(rmu, tiny_prepared, tmp_path, "--model.init_args.rmu_layer", "7")) == 2
    assert "rmu_layer / rmu_update_layers [7, 5, 6, 7] out of range: the model has 2 blocks" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_tofu_and_muse_baseline_yamls_fit_two_steps_on_the_fixtures(tiny_chat_model: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fixtures, bench = ROOT / "tests" / "fixtures", "--data.init_args.benchmark.init_args."
    common = ["--model.init_args.policy.name_or_path", tiny_chat_model, "--model.init_args.policy.tokenizer",
              tiny_chat_model, "--model.init_args.policy.dtype", "float32", "--model.init_args.eval_reference", "null",
              "--model.init_args.export_dir", str(tmp_path / "export"), "--data.init_args.batch_size", "2",
              "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir",
              str(tmp_path / "logs"), f"{bench}tokenizer", tiny_chat_model, *QUIET]
    tofu = lightning_main(["fit", "--config", str(ROOT / "configs" / "baselines" / "tofu_npo.yaml"), *common,
                           "--model.init_args.policy.gradient_checkpointing", "false",
                           f"{bench}source", str(fixtures / "tofu"), f"{bench}rows_per_author", "3"])
    dm = tofu.datamodule
    assert tofu.trainer.global_step == 2 and dm.hparams.forget_rows == "all"
    raw_forget = dm.benchmark.raw["forget"]
    assert [(r["question"], r["answer"]) for r in dm.forget] == [(r["question"], r["answer"]) for r in raw_forget]
    assert all(r["target"] and r["target"] in r["idk"] for r in dm.forget)  # the refusal names the author
    # the benchmark's chat rendering, with the system prompt the TOFU targets were fine-tuned with
    assert all(r["prompt"].startswith("System: You are a helpful assistant.\nUser: ") for r in dm.forget)
    for corpus in ("books", "news"):
        muse = lightning_main(["fit", "--config", str(ROOT / "configs" / "baselines" / f"muse_{corpus}_npo.yaml"),
                               *common, f"{bench}source", str(fixtures / f"muse_{corpus}"), f"{bench}prefix_words", "8",
                               f"{bench}continuation_words", "6", "--model.init_args.export_dir",
                               str(tmp_path / f"export_{corpus}")])
        dm = muse.datamodule
        assert muse.trainer.global_step == 2 and muse.model.policy_cfg.peft == "qlora"
        assert dm.benchmark.hparams.corpus == corpus
        # raw format: the prompt is the window's prefix verbatim, the answer its continuation
        assert dm.forget and all(r["prompt"] == r["question"] and len(r["answer"].split()) == 6 for r in dm.forget)
        # windows that are RL prompts get the benchmark's own refusal naming the corpus, the others idk_answer
        refusals = {p["completion"] for p in dm.benchmark.refusal_pairs(dm.benchmark.raw)}
        assert {r["idk"] for r in dm.forget} <= refusals | {dm.hparams.idk_answer}
        assert any(dm.benchmark.target_name in r["idk"] for r in dm.forget)


def test_a_non_finite_step_leaves_the_weights_and_is_counted(tiny_prepared: dict, tmp_path: Path) -> None:
    cli = lightning_main(_args(ROOT / "configs" / "baselines" / "graddiff.yaml", tiny_prepared, tmp_path,
                               "--trainer.max_steps", "1"), run=False)
    module = cli.model
    real = module.compute_loss

    def poisoned(batch: dict) -> Any:
        loss, parts, n_f, n_r = real(batch)
        return loss * float("nan"), parts, n_f, n_r

    module.compute_loss = poisoned
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert module.nonfinite.total == 1 and cli.trainer.global_step == 1
    assert not _changed(_target_state(tiny_prepared), module.model.state_dict())


def test_a_resumed_fit_ends_exactly_where_the_uninterrupted_one_does(tiny_prepared: dict, tmp_path: Path) -> None:
    config = ROOT / "configs" / "baselines" / "npo.yaml"

    def fit(steps: int, out: str, *extra: str) -> Any:
        return lightning_main(_args(config, tiny_prepared, tmp_path / out, "--trainer.max_steps", str(steps),
                                    "--model.init_args.regularizer", "klr", *extra))

    straight = fit(4, "straight")  # 4 steps cross the epoch boundary (3 batches of 4 forget items per pass)
    first = fit(2, "first")
    ckpt = tmp_path / "first.ckpt"
    first.trainer.save_checkpoint(str(ckpt))
    resumed = fit(4, "resumed", "--ckpt_path", str(ckpt))
    assert resumed.trainer.global_step == 4
    a, b = straight.model.model.state_dict(), resumed.model.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.model.tokens == resumed.model.tokens and straight.model.tokens["retain"] > 0


def test_a_missing_export_names_the_config_that_writes_it() -> None:
    """The hint of a missing model directory points at the shipped config whose ``export_dir`` it is."""
    import yaml

    from rerule_lightning.primitives.policy import missing_path_hint

    checked = []
    for config in sorted((ROOT / "configs").glob("*/*.yaml")):
        if config.parent.name == "models" or config.name == "attack.yaml":  # model-axis overlays: their hint names
            continue  # the stage + model pair below; rerule attack configs are not LightningCLI configs
        export = (yaml.safe_load(config.read_text()).get("model") or {}).get("init_args", {}).get("export_dir")
        if not export or "/runs/" not in export:
            continue
        hint = missing_path_hint(export)
        assert f"`rerule fit --config {config.relative_to(ROOT)}` first." in hint, (config, hint)
        checked.append(config.parent.name)
    # embedded rs/rule, 4 benchmarks x rs/rule, 6 embedded baselines and 3 benchmark baselines
    assert len(checked) == 2 + 8 + 6 + 3 and checked.count("baselines") == 9, checked
    for stage, overlay in (("rs", "configs/models/rs/llama-3.1-8b-instruct.yaml"),
                           ("rule", "configs/models/llama-3.1-8b-instruct.yaml")):
        export = yaml.safe_load((ROOT / overlay).read_text())["model"]["init_args"]["export_dir"]
        assert f"`rerule fit --config configs/tofu/{stage}.yaml --config {overlay}` first." in missing_path_hint(export)
