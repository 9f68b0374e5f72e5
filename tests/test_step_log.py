"""The step's logged numbers (rerule_lightning.rl.step_log) on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from rerule_lightning.rl.step_log import reward_matrix, step_metrics


def test_reward_matrix_is_group_major_and_marks_none_as_not_applicable() -> None:
    rewards, applicable = reward_matrix([1.0, None, 0.5, 0.0, 1, 1], b=3, g=2)
    assert rewards.tolist() == [[1.0, 0.0], [0.5, 0.0], [1.0, 1.0]]
    assert applicable.tolist() == [[True, False], [True, True], [True, True]]
    assert rewards.dtype == torch.float32


def test_step_metrics_by_hand() -> None:
    # B = 3 prompts x G = 2: rewards [[1, 0], [0.5, 0.5], [1, 1]]
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])  # lengths 2 1 3 3 1 2
    log = step_metrics(torch.tensor(0.25, requires_grad=True), {"kl": torch.tensor(0.1), "replay/is_mean": 1.5},
                       rewards, mask, ["forget", "boundary", "boundary"], ["forget", "boundary_hard", "boundary-easy"])
    assert log["train/loss"].item() == 0.25 and not log["train/loss"].requires_grad
    assert log["train/reward"].item() == pytest.approx(4 / 6)
    # Bessel std of (1, 0) = sqrt(0.5); the other two groups have std 0
    assert log["train/reward_std"].item() == pytest.approx(0.5 ** 0.5 / 3)
    assert log["train/frac_reward_zero_std"].item() == pytest.approx(2 / 3)
    assert log["train/completion_length"].item() == pytest.approx(12 / 6)
    assert log["train/reward_forget"].item() == 0.5 and log["train/reward_boundary"].item() == 0.75
    assert log["train/reward_mean_boundary_easy"].item() == 1.0  # '-' is not a metric-key character
    assert log["train/groups_boundary_hard"].item() == 1.0 and log["train/zero_std_frac_forget"].item() == 0.0
    assert log["train/kl"].item() == pytest.approx(0.1) and log["replay/is_mean"].item() == 1.5  # scope kept
    assert "train/reward_applicable_frac" not in log  # every reward applies: not logged


def test_step_metrics_mean_over_the_rewards_that_apply() -> None:
    rewards, applicable = reward_matrix([1.0, None, None, None], b=2, g=2)
    log = step_metrics(torch.tensor(0.0), {}, rewards, torch.ones(4, 1), ["forget", "boundary"], None, applicable)
    assert log["train/reward_applicable_frac"].item() == 0.25
    assert log["train/reward_applicable_mean"].item() == 1.0  # not 0.25: n/a is not a 0
    assert log["train/reward"].item() == 0.25
    assert set(k for k in log if "reward_mean_" in k) == {"train/reward_mean_forget", "train/reward_mean_boundary"}
