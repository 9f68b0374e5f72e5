"""Non-finite guard: NaN rewards, NaN logits and Inf gradients skip the optimizer step (parameters and AdamW
state untouched), are counted and logged, and N in a row stop the fit with a checkpoint of the last good state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.guards import NonFiniteCounter, NonFiniteError, all_finite, grads_finite
from rerule_lightning.primitives.policy import PolicyConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder(L.Callback):
    """Parameters, the logged skip counter and the AdamW step count after every batch."""

    def __init__(self, inject: dict[int, str] | None = None) -> None:
        self.inject = inject or {}
        self.params: list[dict[str, torch.Tensor]] = []
        self.skipped: list[float] = []
        self.consecutive: list[int] = []
        self.handles: list[Any] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        kind = self.inject.get(trainer.global_step)
        if kind == "inf_grad":  # finite loss, Inf gradient on one parameter
            p = next(pl_module.model.parameters())
            self.handles.append(p.register_hook(lambda g: torch.full_like(g, math.inf)))
        if kind == "nan_logits":  # NaN logits in the training forward passes (generation runs in eval mode)
            def hook(mod, args, out):
                if mod.training:
                    out.logits = out.logits * math.nan  # keeps the graph: NaN loss and NaN gradients
                return out
            self.handles.append(pl_module.model.register_forward_hook(hook))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.params.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        self.skipped.append(float(trainer.callback_metrics["train/nonfinite_skipped"]))
        self.consecutive.append(pl_module.nonfinite.consecutive)


def nan_rewards_at(module: GRPOUnlearningModule, calls: set[int]) -> None:
    """Make the module's reward function return NaN on the given (0-based) calls."""
    real, count = module.reward_fn, {"n": 0}

    def reward_fn(*args: Any, **kwargs: Any) -> list[float]:
        out = real(*args, **kwargs)
        n, count["n"] = count["n"], count["n"] + 1
        return [math.nan] * len(out) if n in calls else out

    module.reward_fn = reward_fn


def run(tiny_prepared: dict, tmp_path: Path, recorder: Recorder, max_steps: int, nan_calls: set[int] = frozenset(),
        **module_kw: Any) -> tuple[GRPOUnlearningModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    links = tiny_prepared["links"]
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=links["target"]), num_generations=2,
                                  max_new_tokens=4, learning_rate=1e-3, beta=0.0, temperature=2.0, **module_kw)
    nan_rewards_at(module, set(nan_calls))
    data = ForgetRetainDataModule(world_dir=links["world"], preset="hard", batch_size=2)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        callbacks=[recorder], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    return module, trainer


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_guard_functions_on_hand_built_tensors() -> None:
    assert all_finite([torch.ones(3), None]) and not all_finite([torch.tensor([1.0, math.nan])])
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([0.0, -math.inf])
    assert not grads_finite([p]) and grads_finite([torch.nn.Parameter(torch.ones(1))])
    c = NonFiniteCounter(limit=2)
    for finite in (False, True, False, False):
        c.update(finite)
    assert (c.total, c.consecutive, c.exhausted) == (3, 2, True)


def test_nan_reward_and_inf_gradient_skip_the_step_and_are_counted(tiny_prepared: dict, tmp_path: Path) -> None:
    rec = Recorder(inject={2: "inf_grad"})
    module, trainer = run(tiny_prepared, tmp_path, rec, max_steps=4, nan_calls={1})  # NaN rewards at step 1
    assert trainer.global_step == 4  # skipped steps still count, so the batch schedule is unchanged
    assert rec.skipped == [0.0, 1.0, 2.0, 2.0]
    assert rec.consecutive == [0, 1, 2, 0]
    assert same(rec.params[1], rec.params[0]), "a NaN-reward step changed the parameters"
    assert same(rec.params[2], rec.params[1]), "an Inf-gradient step changed the parameters"
    assert not same(rec.params[3], rec.params[2]), "training did not resume after the skipped steps"
    steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {2}, f"AdamW advanced on a skipped step: {steps}"
    assert module.nonfinite.state_dict() == {"total": 2, "consecutive": 0}


def test_consecutive_nan_logits_stop_with_a_checkpoint_of_the_last_good_state(tiny_prepared: dict,
                                                                              tmp_path: Path) -> None:
    rec = Recorder(inject={1: "nan_logits", 2: "nan_logits", 3: "nan_logits"})
    with pytest.raises(NonFiniteError) as info:
        run(tiny_prepared, tmp_path, rec, max_steps=6, max_consecutive_nonfinite=2)
    ckpt_path = tmp_path / "nonfinite_stop.ckpt"
    message = str(info.value)
    assert "2 optimizer steps in a row" in message and "max_consecutive_nonfinite=2" in message
    assert str(ckpt_path) in message and "--ckpt_path" in message
    assert rec.skipped == [0.0, 1.0]  # step 0 good, step 1 skipped, the fit stopped inside step 2
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["nonfinite"] == {"total": 2, "consecutive": 0}
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert saved.keys() == rec.params[0].keys()
    assert same(saved, rec.params[0]), "the stop checkpoint is not the state after the last finite step"


def test_counters_survive_a_checkpoint(tiny_prepared: dict, tmp_path: Path) -> None:
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=tiny_prepared["links"]["target"]))
    module.nonfinite.update(False)
    ckpt: dict[str, Any] = {}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.pt")
    other = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=tiny_prepared["links"]["target"]))
    other.on_load_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True))
    assert other.nonfinite.state_dict() == {"total": 1, "consecutive": 1}


def test_bad_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_consecutive_nonfinite=0"):
        GRPOUnlearningModule(max_consecutive_nonfinite=0)


def test_cli_reports_the_stop_as_one_error_line(tiny_prepared: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Through `rerule fit`: every reward NaN -> N skipped steps -> exit status 1 and one `rerule: error:` line."""
    import rerule_lightning.modules.grpo as gm
    from rerule_lightning.cli.commands import main
    from tests.test_cli_configs import QUIET, RULE, _rule_overrides

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gm, "RewardContract", lambda *a, **k: lambda prompts, **kw: [math.nan] * len(prompts))
    rc = main(["fit", "--config", str(RULE), *_rule_overrides(tiny_prepared, tmp_path),
               "--model.init_args.max_consecutive_nonfinite", "2", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0", *QUIET])
    err = capsys.readouterr().err
    assert rc == 1
    assert "rerule: error:" in err and "max_consecutive_nonfinite=2" in err and "Traceback" not in err
    assert (tmp_path / "nonfinite_stop.ckpt").is_file()
