"""GRPOUnlearningModule end to end on the tiny prepared world: what a fit changes, what it must not, the
RolloutGroup contract with replay callbacks, and constructor validation."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.policy import PolicyConfig, reference_context
from rerule_lightning.primitives.rollout import RolloutGroup, completion_mask_from_ids, pack_sequences
from rerule_lightning.rl.grpo import token_logprobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

G = 4  # completions per prompt
B = 4  # prompts per step (2 forget + 2 boundary)
# Temperature 2 makes the peaked tiny target sample varied completions, hence non-zero advantages from the
# first step on; lr 1e-2 without weight decay or grad clipping moves every parameter that gets a gradient.
MODULE_ARGS = dict(num_generations=G, max_new_tokens=8, temperature=2.0, learning_rate=1e-2, weight_decay=0.0,
                   max_grad_norm=0.0, beta=0.1, seed=0)




def make(tiny: dict, peft: str = "full", **overrides: Any) -> tuple[GRPOUnlearningModule, ForgetRetainDataModule]:
    policy = PolicyConfig(name_or_path=tiny["links"]["target"], peft=peft, lora_r=4, lora_alpha=8)
    module = GRPOUnlearningModule(policy=policy, **{**MODULE_ARGS, **overrides})
    data = ForgetRetainDataModule(world_dir=tiny["links"]["world"], batch_size=B, epoch_length=100)
    return module, data


def fit(module: L.LightningModule, data: L.LightningDataModule, steps: int, root: Any,
        callbacks: list[L.Callback] | None = None) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=False, accelerator="cpu", devices=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(root), callbacks=callbacks or [])
    trainer.fit(module, data)
    return trainer


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


class Capture(L.Callback):
    """Records global_step at batch start and the step outputs / batch at batch end (changes nothing)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.outputs: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.outputs.append(outputs)
        self.batches.append(batch)


class InjectPrevious(L.Callback):
    """A minimal replay callback: puts the previous step's fresh groups into the batch."""

    OPTIONS = {"correction": "truncated", "cap": 2.0, "level": "token", "weight": 1.0}

    def __init__(self) -> None:
        self.previous: list[RolloutGroup] = []
        self.injected = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.previous:
            batch["replay"] = [RolloutGroup(**{**g.to_state(), "advantages": g.advantages.float()})
                               for g in self.previous]
            batch["replay_options"] = dict(self.OPTIONS)
            self.injected += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.previous = list(outputs["groups"])


# ----------------------------------------------------------------------------------------- full fine-tuning
@pytest.fixture(scope="module")
def full_run(tiny_prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    module, data = make(tiny_prepared)
    module.configure_model()  # idempotent: the fit reuses these weights, so the snapshots are the start point
    before = snapshot(module.model)
    ref_before = snapshot(module.ref_model)
    capture = Capture()
    trainer = fit(module, data, 3, tmp_path_factory.mktemp("full"), [capture])
    return {"module": module, "trainer": trainer, "before": before, "ref_before": ref_before, "capture": capture}


def test_full_fit_changes_every_trainable_parameter_and_not_the_reference(full_run: dict) -> None:
    module, before = full_run["module"], full_run["before"]
    assert full_run["trainer"].global_step == 3
    trainable = {k for k, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == set(before), "full fine-tuning trains every parameter"
    unchanged = [k for k, p in module.model.named_parameters() if torch.equal(p.detach(), before[k])]
    assert not unchanged, f"parameters not updated by 3 steps: {unchanged}"

    ref = module.ref_model
    assert ref is not None and ref is not module.model
    assert not any(p.requires_grad for p in ref.parameters())
    policy_storage = {p.data_ptr() for p in module.model.parameters()}
    assert not any(p.data_ptr() in policy_storage for p in ref.parameters()), "reference shares the policy's storage"
    changed = [k for k, p in ref.named_parameters() if not torch.equal(p, full_run["ref_before"][k])]
    assert not changed, f"the reference model changed: {changed}"


def test_training_step_outputs_are_rollout_groups(full_run: dict) -> None:
    capture, module = full_run["capture"], full_run["module"]
    tok = module.tokenizer
    assert capture.steps == [0, 1, 2]
    assert len(capture.outputs) == 3
    for step, out, batch in zip(capture.steps, capture.outputs, capture.batches):
        assert torch.is_tensor(out["loss"]) and out["loss"].dim() == 0 and torch.isfinite(out["loss"])
        groups = out["groups"]
        assert len(groups) == len(batch["prompt"]) == B
        assert [g.prompt_id for g in groups] == list(batch["id"])
        assert [g.label for g in groups] == list(batch["label"])
        assert sorted(g.label for g in groups) == ["boundary", "boundary", "forget", "forget"]
        longest = max(int(g.completion_mask.sum(1).max()) for g in groups)
        for g in groups:
            assert isinstance(g, RolloutGroup)
            assert g.step == step, "a group's step is the global_step at which it was sampled"
            ids, mask, lp = g.completion_ids, g.completion_mask, g.behaviour_logprobs
            assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == G == g.num_completions
            t = ids.shape[1]
            assert 1 <= t <= MODULE_ARGS["max_new_tokens"] and t == longest  # trimmed to the longest completion
            assert mask.shape == lp.shape == (G, t)
            assert ids.device.type == mask.device.type == lp.device.type == "cpu"
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            for row_ids, row_mask in zip(ids, mask):
                eos = (row_ids == tok.eos_token_id).nonzero().flatten()
                n_real = int(eos[0]) + 1 if len(eos) else t
                expected = torch.zeros(t)
                expected[:n_real] = 1.0
                assert torch.equal(row_mask, expected), (row_ids, row_mask)
                assert (row_ids[n_real:] == tok.pad_token_id).all()
            assert torch.isfinite(lp).all()
            assert (lp[mask == 0] == 0).all()
            assert (lp[mask == 1] <= 0).all()
            assert g.rewards.shape == (G,) and set(g.rewards.tolist()) <= {0.0, 0.5, 1.0}
            assert g.advantages is not None and g.advantages.shape == (G,)
            assert len(g.completions) == G and all(isinstance(c, str) for c in g.completions)
            assert g.prompt_ids.dim() == 1 and (g.prompt_ids != tok.pad_token_id).all()
            restored = RolloutGroup.from_state(g.to_state())
            assert torch.equal(restored.completion_ids, ids) and restored.step == g.step


def test_completion_mask_includes_first_eos_only() -> None:
    eos = 2
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    assert torch.equal(completion_mask_from_ids(ids, eos), expected)


def test_no_callback_trains_exactly_as_with_a_no_op_callback(full_run: dict, tiny_prepared: dict,
                                                            tmp_path: Any) -> None:
    module, data = make(tiny_prepared)
    trainer = fit(module, data, 3, tmp_path)
    assert trainer.global_step == 3
    reference = dict(full_run["module"].model.named_parameters())
    differ = [k for k, p in module.model.named_parameters() if not torch.equal(p, reference[k])]
    assert not differ, f"a read-only callback changed training: {differ}"
    assert "replay/is_weight_mean" not in trainer.callback_metrics


def test_replayed_groups_in_the_batch_are_trained_on_and_logged(full_run: dict, tiny_prepared: dict,
                                                               tmp_path: Any) -> None:
    module, data = make(tiny_prepared)
    inject = InjectPrevious()
    trainer = fit(module, data, 3, tmp_path, [inject])
    assert inject.injected == 2  # steps 1 and 2 replay the groups of steps 0 and 1
    metrics = trainer.callback_metrics
    for key in ("replay/is_weight_mean", "replay/is_weight_max"):
        assert key in metrics, sorted(metrics)
        assert torch.isfinite(metrics[key]) and float(metrics[key]) > 0
    assert float(metrics["replay/is_weight_max"]) >= float(metrics["replay/is_weight_mean"])
    # same seed and fresh rollouts of step 0; the replay loss makes the later updates differ
    plain = dict(full_run["module"].model.named_parameters())
    assert any(not torch.equal(p, plain[k]) for k, p in module.model.named_parameters())


# --------------------------------------------------------------------------------------------------- LoRA
def _logprobs_of(model: torch.nn.Module, groups: list[RolloutGroup], pad_id: int, temperature: float,
                 reference: bool = False) -> torch.Tensor:
    p_ids = [g.prompt_ids for g in groups for _ in range(g.num_completions)]
    t = max(g.completion_ids.size(1) for g in groups)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, t - x.size(1)), value=v)  # noqa: E731
    c_ids = torch.cat([pad(g.completion_ids, pad_id) for g in groups])
    c_mask = torch.cat([pad(g.completion_mask, 0.0) for g in groups])
    input_ids, attn, p = pack_sequences(p_ids, c_ids, c_mask, pad_id)
    with torch.no_grad():
        if reference:
            with reference_context(model):
                logits = model(input_ids=input_ids, attention_mask=attn).logits
        else:
            logits = model(input_ids=input_ids, attention_mask=attn).logits
    lp = token_logprobs(logits[:, p - 1:-1] / temperature, input_ids[:, p:])
    return lp * c_mask[:, :lp.size(1)]


def test_lora_fit_trains_adapters_only_and_reference_is_the_base(tiny_prepared: dict, tmp_path: Any) -> None:
    from transformers import AutoModelForCausalLM

    module, data = make(tiny_prepared, peft="lora")
    module.configure_model()
    assert module.ref_model is None, "under LoRA the reference is the base with adapters disabled, no copy"
    causal_lms = [m for m in module.modules() if type(m).__name__ == "LlamaForCausalLM"]
    assert len(causal_lms) == 1, "one model in memory"
    before = snapshot(module.model)
    lora = {k for k in before if "lora_" in k}
    assert lora, "no LoRA parameters"
    assert {k for k, p in module.model.named_parameters() if p.requires_grad} == lora
    capture = Capture()
    fit(module, data, 3, tmp_path, [capture])
    assert module.ref_model is None
    after = dict(module.model.named_parameters())
    unchanged = sorted(k for k in lora if torch.equal(after[k], before[k]))
    assert not unchanged, f"LoRA parameters not updated: {unchanged}"
    changed_base = sorted(k for k in before if k not in lora and not torch.equal(after[k], before[k]))
    assert not changed_base, f"frozen base weights changed: {changed_base}"

    groups = capture.outputs[-1]["groups"]
    pad_id, temp = module.tokenizer.pad_token_id, MODULE_ARGS["temperature"]
    base = AutoModelForCausalLM.from_pretrained(tiny_prepared["links"]["target"]).eval()
    expected = _logprobs_of(base, groups, pad_id, temp)
    module.model.eval()
    ref = _logprobs_of(module.model, groups, pad_id, temp, reference=True)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    # the module's own reference pass (the one its KL uses) is the same
    p_ids = [g.prompt_ids for g in groups for _ in range(G)]
    c_ids = torch.cat([torch.nn.functional.pad(g.completion_ids, (0, ref.size(1) - g.completion_ids.size(1)),
                                               value=pad_id) for g in groups])
    c_mask = torch.cat([torch.nn.functional.pad(g.completion_mask, (0, ref.size(1) - g.completion_mask.size(1)))
                        for g in groups])
    with torch.no_grad():
        mod_ref, m = module.sequence_logprobs(p_ids, c_ids, c_mask, reference=True)
    torch.testing.assert_close(mod_ref * m, expected[:, :mod_ref.size(1)], atol=1e-5, rtol=1e-5)
    # outside the context the adapters are active again: the trained policy differs from the base
    policy = _logprobs_of(module.model, groups, pad_id, temp)
    assert not torch.allclose(policy, expected, atol=1e-4)


def _bnb_4bit_cpu_error() -> str | None:
    """Why bitsandbytes cannot run a 4-bit layer on this CPU, or None if it can."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cpu")
        out = layer(torch.randn(2, 16))
        assert out.shape == (2, 16)
    except Exception as e:  # any failure means no 4-bit on this machine
        return f"{type(e).__name__}: {e}"
    return None


def test_qlora_fit_trains_lora_weights(tiny_prepared: dict, tmp_path: Any) -> None:
    reason = _bnb_4bit_cpu_error()
    if reason is not None:
        pytest.skip(f"bitsandbytes cannot run 4-bit NF4 on this CPU: {reason}")
    import bitsandbytes as bnb

    module, data = make(tiny_prepared, peft="qlora")
    module.configure_model()
    assert module.ref_model is None
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules()), "base is not 4-bit"
    before = snapshot(module.model)
    lora = {k for k, p in module.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in k for k in lora)
    trainer = fit(module, data, 2, tmp_path)
    assert trainer.global_step == 2
    after = dict(module.model.named_parameters())
    unchanged = sorted(k for k in lora if torch.equal(after[k], before[k]))
    assert not unchanged, f"LoRA parameters not updated under QLoRA: {unchanged}"
    assert all(torch.isfinite(after[k]).all() for k in lora)


# ------------------------------------------------------------------------------------ constructor checks
@pytest.mark.parametrize("kwargs, name", [
    ({"num_generations": 1}, "num_generations"),
    ({"loss_type": "x"}, "loss_type"),
    ({"scale_rewards": "x"}, "scale_rewards"),
    ({"reward": "no_such_reward"}, "reward"),
])
def test_bad_constructor_args_fail_before_loading(monkeypatch: pytest.MonkeyPatch, kwargs: dict, name: str) -> None:
    import rerule_lightning.modules.grpo as gm

    def no_loading(*args: Any, **kw: Any) -> None:
        raise AssertionError("weights or tokenizer loaded before validation")

    for fn in ("build_policy", "load_base_model", "load_tokenizer"):
        monkeypatch.setattr(gm, fn, no_loading)
    with pytest.raises(ValueError, match=f"{name}="):
        GRPOUnlearningModule(policy=PolicyConfig(name_or_path="/nonexistent/model"), **kwargs)
