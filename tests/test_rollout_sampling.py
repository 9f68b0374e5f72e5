"""Rollouts sample exactly what π_old assumes: a model whose saved generation config sets ``repetition_penalty``,
``top_k`` and ``temperature`` is still sampled from the module's temperature-scaled softmax, and the behaviour
log-probs equal the log-probs of the distribution each token was drawn from. Distribution-changing
``generation_kwargs`` are refused before anything loads."""

from __future__ import annotations

import json
import shutil
from typing import Any

import lightning as L
import pytest
import torch

from datamodules.forget_retain import ForgetRetainDataModule
from rerule_lightning.modules.grpo import GRPOUnlearningModule
from rerule_lightning.primitives.generation import end_at_stop_strings
from rerule_lightning.primitives.policy import PolicyConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def penalised_model(tiny_prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny target with a generation config that would change sampling if rollouts inherited it."""
    out = tmp_path_factory.mktemp("penalised") / "model"
    shutil.copytree(tiny_prepared["links"]["target"], out)
    (out / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "repetition_penalty": 5.0, "top_k": 2, "temperature": 0.3, "min_new_tokens": 4}))
    return str(out)


class Scores(L.Callback):
    """Wraps ``generate`` to also return the processed scores (the logits each token was sampled from)."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.sequences: list[torch.Tensor] = []
        self.outputs: list[dict[str, Any]] = []
        self.seen_configs: list[Any] = []

    def on_train_start(self, trainer, pl_module):  # noqa: D102
        model = pl_module.model
        real = model.generate

        def generate(*args, generation_config=None, **kw):
            self.seen_configs.append(model.generation_config)
            generation_config.output_scores = True
            generation_config.return_dict_in_generate = True
            out = real(*args, generation_config=generation_config, **kw)
            self.scores.append(torch.stack(out.scores, 1).float())  # [B*G, T, V]
            self.sequences.append(out.sequences)
            return out.sequences

        model.generate = generate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.outputs.append(outputs)


@pytest.mark.parametrize("generation_batch_size", [None, 8])
def test_behaviour_logprobs_are_the_sampling_distribution(penalised_model: str, tiny_prepared: dict,
                                                          generation_batch_size: int | None) -> None:
    L.seed_everything(0, verbose=False)
    module = GRPOUnlearningModule(policy=PolicyConfig(name_or_path=penalised_model), num_generations=4,
                                  max_new_tokens=8, temperature=TEMPERATURE, beta=0.0, seed=0,
                                  generation_batch_size=generation_batch_size)
    data = ForgetRetainDataModule(world_dir=tiny_prepared["links"]["world"], batch_size=4, seed=0)
    spy = Scores()
    L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
              callbacks=[spy]).fit(module, datamodule=data)
    assert module.model.generation_config.repetition_penalty == 5.0  # the model's own config is restored after
    assert spy.seen_configs[0].repetition_penalty in (None, 1.0)  # ... and hidden during the rollout (defaults)
    assert [s.size(0) for s in spy.scores] == ([16] if generation_batch_size is None else [8, 8])
    width = max(s.size(1) for s in spy.scores)
    scores = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, width - s.size(1))) for s in spy.scores])  # [16, T, V]
    sampled = torch.log_softmax(scores, -1)
    groups = spy.outputs[0]["groups"]
    beh = torch.cat([g.behaviour_logprobs for g in groups])  # [16, T']
    ids = torch.cat([g.completion_ids for g in groups])
    mask = torch.cat([g.completion_mask for g in groups])
    t = beh.size(1)
    drawn = sampled[:, :t].gather(-1, ids[:, :, None].clamp(min=0)).squeeze(-1)  # [16, T']
    # float32, the same logits from generate's KV-cached pass and the training pass: agree to ~1e-6
    torch.testing.assert_close(beh * mask, drawn * mask, atol=1e-4, rtol=1e-4)
    # no token was masked out: neither the saved top_k nor its min_new_tokens (which forbids EOS) was applied
    assert torch.isfinite(scores).all(), "the model's generation config masked tokens in the rollout"


def test_distribution_changing_generation_kwargs_are_refused(no_weight_loading: None) -> None:
    with pytest.raises(ValueError, match=r"generation_kwargs.repetition_penalty: not allowed in rollouts.*allowed: "
                                         r"cache_implementation, cache_config, use_cache, stop_strings"):
        GRPOUnlearningModule(generation_kwargs={"repetition_penalty": 1.2, "cache_implementation": "static"})
    GRPOUnlearningModule(generation_kwargs={"cache_implementation": "static", "stop_strings": ["\n\n"]})


def test_a_stop_string_end_is_not_a_sampled_eos() -> None:
    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join({1: "a", 2: "b", 3: "\n"}.get(int(i), "") for i in ids)

    eos = 9
    ids = torch.tensor([[1, 3, 3, eos, eos], [1, 2, eos, eos, eos], [1, 2, 1, 2, 1]])  # stopped, EOS, no end
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    out = end_at_stop_strings(ids, mask, Tok(), ["\n\n"], [eos])
    assert out.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
