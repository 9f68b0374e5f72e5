"""TRL's reward contract: every reward is called by keyword (``prompts=, completions=, completion_ids=,
trainer_state=`` and the batch's columns under their own names); reward functions copied from TRL's documentation
run unchanged through the YAML; each reward's mean / std is logged; a reward that cannot take the call or returns
a wrong result is refused before training with one line naming it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from rerule_lightning.cli.commands import main
from rerule_lightning.rl.reward_contract import (
    RewardContract,
    RewardTrainerState,
    completion_id_lists,
    per_function_metrics,
    result_error,
)
from rerule_lightning.rl.rewards import rule_reward
from tests.test_cli_configs import QUIET, RULE, _rule_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS: list[dict[str, Any]] = []
STATES: list[Any] = []


# --- verbatim from TRL's GRPOTrainer documentation ("Using a custom reward function", standard format) ---------
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    matches = [re.match(pattern, content) for content in completions]
    return [1.0 if match else 0.0 for match in matches]
# ------------------------------------------------------------------------------------------------------------------


def reference_overlap(prompts, completions, completion_ids, reference, label, trainer_state, **kwargs):
    """A TRL-style reward reading dataset columns by their own names (``reference``, ``label``)."""
    STATES.append((trainer_state, [len(c) for c in completion_ids]))
    return [None if lab == "forget" else float(bool(set(c.split()) & set(str(ref).split())))
            for c, ref, lab in zip(completions, reference, label)]


def positional_only(prompts, completions, labels):  # the old project contract: cannot take TRL's call
    return [0.0] * len(completions)


def too_few(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def wrong_type(completions, **kwargs):
    return ["high"] * len(completions)


class Record(L.Callback):
    """Each step's groups and logged metrics."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        STEPS.append({"groups": outputs["groups"],
                      "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}})


def test_contract_pieces_by_hand() -> None:
    ids = torch.tensor([[5, 6, 2, 0], [7, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert completion_id_lists(ids, mask) == [[5, 6, 2], [7]]
    m = per_function_metrics({"a": [1.0, None, 0.0, 0.5], "b": [None, None]})
    assert float(m["train/rewards/a/mean"]) == pytest.approx(0.5)
    assert float(m["train/rewards/a/std"]) == pytest.approx(0.5)  # Bessel: sqrt((0.25 + 0.25 + 0) / 2)
    assert "train/rewards/b/mean" not in m  # applied to nothing this step
    assert result_error("f", [1, None, 0.5], 3) is None
    assert "returned 2 values for 3 completions" in result_error("f", [1, 2], 3)
    assert "returned str 'x' for completion 1" in result_error("f", [1.0, "x"], 2)
    assert "returned float" in result_error("f", 1.0, 1)
    # the project's rewards through the same keyword call, columns under the batch's names
    c = RewardContract(["rule", "test_reward_contract:reward_len"], [1.0, 0.5])
    call = {"prompts": ["q1", "q2"], "completions": ["I'm sorry, I can't answer that.", "Paris is nice"],
            "completion_ids": [[1], [2]], "trainer_state": RewardTrainerState(), "label": ["forget", "boundary"],
            "reference": ["x", "Paris"], "value": ["x", "Paris"], "target": ["Zed", "Bob"], "id": ["1", "2"]}
    total, per = c.score(**call)
    expected = rule_reward(call["prompts"], call["completions"], labels=call["label"], references=call["reference"])
    assert per["rule"] == expected == [1.0, 1.0]
    assert per["reward_len"] == [-abs(20 - 31), -abs(20 - 13)]
    assert total == [1.0 + 0.5 * -11, 1.0 + 0.5 * -7]
    assert RewardContract("rule_target_aware", settings={"target_aware": False}).score(**call)[1][
        "rule_target_aware"][0] == 0.5  # the registry entry's own target_aware wins over the module default


def test_trl_documented_rewards_run_unchanged_through_yaml(tiny_prepared: dict, tmp_path: Path) -> None:
    STEPS.clear()
    STATES.clear()
    overlay = tmp_path / "trl.yaml"
    overlay.write_text(
        "model:\n  init_args:\n    reward: [test_reward_contract:reward_len, test_reward_contract:format_reward_func,"
        " test_reward_contract:reference_overlap, rule_fact]\n    reward_weights: [0.1, 1.0, 1.0, 1.0]\n"
        "trainer:\n  callbacks:\n    - class_path: test_reward_contract.Record\n")
    rc = main(["fit", "--config", str(RULE), "--config", str(overlay), *_rule_overrides(tiny_prepared, tmp_path),
               "--model.init_args.export_dir", "null", "--trainer.max_steps", "2", *QUIET])
    assert rc == 0 and len(STEPS) == 2
    probe, trained = STATES[0], STATES[1:]  # the preflight's probe call (one forget, one boundary row), then steps
    assert len(probe[1]) == 2 and probe[0] == RewardTrainerState()
    for step in STEPS:
        texts = [c for grp in step["groups"] for c in grp.completions]
        labels = [grp.label for grp in step["groups"] for _ in grp.completions]
        lens = [-abs(20 - len(t)) for t in texts]
        m = step["metrics"]
        assert m["train/rewards/reward_len/mean"] == pytest.approx(sum(lens) / len(lens), rel=1e-6)
        assert m["train/rewards/reward_len/std"] == pytest.approx(torch.tensor(lens, dtype=torch.float).std().item(),
                                                                  rel=1e-5)
        assert m["train/rewards/format_reward_func/mean"] == 0.0  # no completion has the <think> format
        assert "train/rewards/rule_fact/mean" in m and "train/rewards/reference_overlap/std" in m
        assert len(texts) == 16 and labels.count("forget") == 8
        # the combined reward is what the groups carry: 0.1 x len + format + rule_fact (+ overlap on boundary)
        rewards = torch.cat([grp.rewards for grp in step["groups"]]).float()
        assert torch.all(rewards <= 0.1 * torch.tensor(lens, dtype=torch.float) + 2.0 + 1e-5)
    assert [s.global_step for s, _ in trained] == [0, 1] and trained[0][0].max_steps == 2
    assert all(0 < n <= 8 for n in trained[0][1])  # completion_ids: each completion's ids, no padding


@pytest.mark.parametrize(("reward", "message"), [
    ("test_reward_contract:positional_only", "reward 'test_reward_contract:positional_only' (positional_only) "
                                             "cannot take TRL's reward call"),
    ("test_reward_contract:too_few", "returned 1 values for 2 completions"),
    ("test_reward_contract:wrong_type", "returned str 'high' for completion 0"),
])
def test_bad_reward_refused_before_training(tiny_prepared: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            reward: str, message: str) -> None:
    rc = main(["fit", "--config", str(RULE), *_rule_overrides(tiny_prepared, tmp_path),
               "--model.init_args.reward", reward, "--model.init_args.export_dir", "null",
               "--trainer.max_steps", "1", *QUIET])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("rerule: error: --model.init_args.reward: ")
    assert message in lines[-1] and "Traceback" not in "\n".join(lines)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))
