"""Safe loading: checkpoints and replay buffers load with ``weights_only=True``, a pickle-bearing checkpoint is
refused before its payload runs, ``trust_remote_code`` is off unless a config sets it, YAML is parsed safely."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from rerule_lightning.cli.commands import lightning_main, main
from rerule_lightning.primitives.checkpointing import AtomicCheckpointIO, safe_load, validate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Payload:
    """Unpickling this creates ``marker``: proof that code ran while loading."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def tiny_checkpoint(tiny_prepared: dict, directory: Path, steps: int = 3) -> Path:
    """A real ReRULE checkpoint (replay buffer filled) from a tiny fit, written through ``AtomicCheckpointIO``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.replay import HardCaseReplayCallback
    from datamodules.forget_retain import ForgetRetainDataModule
    from rerule_lightning.modules.grpo import GRPOUnlearningModule
    from rerule_lightning.primitives.policy import PolicyConfig

    L.seed_everything(0, verbose=False)
    links = tiny_prepared["links"]
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=links["target"]), num_generations=2,
                                  max_new_tokens=4, learning_rate=1e-3, beta=0.01, temperature=2.0)
    data = ForgetRetainDataModule(world_dir=links["world"], preset="hard", batch_size=2)
    replay = HardCaseReplayCallback(spend="add", advantages="running",
                                    collect_steps=2, reward_threshold=1.0, require_variance=False, replay_groups=1)
    ckpt = ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[replay, ckpt],
                        plugins=[AtomicCheckpointIO()], default_root_dir=str(directory))
    trainer.fit(module, datamodule=data)
    return directory / "last.ckpt"


@pytest.fixture(scope="module")
def real_ckpt(tiny_prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tiny_prepared, tmp_path_factory.mktemp("safe-ckpt"))


def test_real_checkpoint_and_replay_buffer_load_with_weights_only(real_ckpt: Path) -> None:
    ckpt = torch.load(real_ckpt, weights_only=True)
    replay = [v for k, v in ckpt["callbacks"].items() if k.startswith("HardCaseReplayCallback")]
    assert len(replay) == 1 and len(replay[0]["buffer"]) > 0, "the checkpoint holds no replay buffer"
    group = replay[0]["buffer"][0]["group"]
    assert torch.is_tensor(group["completion_ids"]) and isinstance(group["prompt_id"], str)
    assert ckpt["nonfinite"] == {"total": 0, "consecutive": 0}
    assert isinstance(ckpt["hyper_parameters"]["policy"], dict)
    assert not list(real_ckpt.parent.glob(".*.tmp-*")), "a temporary checkpoint file was left behind"


def test_pickle_bearing_checkpoint_is_refused_and_its_payload_never_runs(real_ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    ckpt = torch.load(real_ckpt, weights_only=True)
    ckpt["extra"] = Payload(str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    for load in (safe_load, validate_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(ValueError, match=r"evil\.ckpt.*refused.*weights_only=True"):
            load(str(evil))
    assert not marker.exists(), "the pickled payload ran while loading"


def test_resume_goes_through_the_weights_only_loader(tiny_prepared: dict, real_ckpt: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``rerule fit --ckpt_path`` loads through AtomicCheckpointIO, never with weights_only=False."""
    calls: list[Any] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.chdir(tmp_path)
    links = tiny_prepared["links"]
    rc = main(["fit", "--config", str(RULE), "--model.init_args.policy.name_or_path", links["target"],
               "--data.init_args.world_dir", links["world"], "--data.init_args.batch_size", "2",
               "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4",
               "--model.init_args.temperature", "2.0", "--model.init_args.export_dir", "null",
               "--trainer.max_steps", "4", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(real_ckpt)])
    assert rc == 0
    assert calls and all(c is True for c in calls), f"torch.load called with weights_only={calls}"


def test_trust_remote_code_is_off_unless_a_config_sets_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from rerule_lightning.primitives.policy import load_base_model, load_tokenizer

    seen: list[tuple[str, Any]] = []

    class Stop(Exception):
        pass

    def record(name: str) -> Any:
        def from_pretrained(path: str, **kwargs: Any) -> None:
            seen.append((name, kwargs.get("trust_remote_code", "absent")))
            raise Stop

        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.logger", "false", "--model.init_args.policy.name_or_path", "org/model"]
    default = lightning_main(["fit", "--config", str(RULE), *quiet], run=False).model.policy_cfg
    opted_in = lightning_main(["fit", "--config", str(RULE), *quiet,
                               "--model.init_args.policy.trust_remote_code", "true"], run=False).model.policy_cfg
    for cfg in (default, opted_in):
        for load in (load_tokenizer, lambda c: load_base_model(c.name_or_path, c)):
            with pytest.raises(Stop):
                load(cfg)
    assert seen == [("tokenizer", False), ("model", False), ("tokenizer", True), ("model", True)]


def test_yaml_python_tags_are_rejected_and_never_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "yaml-payload-ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text("model:\n  init_args:\n    reward: !!python/object/apply:builtins.open "
                    f"['{marker}', 'w']\n")
    assert main(["fit", "--config", str(RULE), "--config", str(evil), "--trainer.logger", "false"]) == 2
    err = capsys.readouterr().err
    assert "rerule: error: " in err and "python/object/apply" in err and "Traceback" not in err
    assert not marker.exists(), "a YAML python tag was executed"


def test_atomic_write_failing_half_way_keeps_the_previous_last(real_ckpt: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A write killed half-way (here: raising after half the bytes) never replaces a good ``last.ckpt``."""
    last = tmp_path / "last.ckpt"
    good = torch.load(real_ckpt, weights_only=True)
    io = AtomicCheckpointIO()
    io.save_checkpoint(good, last)
    before = last.read_bytes()
    real_save = torch.save

    def half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        import io as _io

        buf = _io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("simulated crash during the write")

    monkeypatch.setattr(torch, "save", half_then_die)
    newer = {**good, "global_step": good["global_step"] + 1}
    with pytest.raises(OSError, match="simulated crash"):
        io.save_checkpoint(newer, last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert io.load_checkpoint(last)["global_step"] == good["global_step"]
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"], "a half-written temporary file was left behind"
