"""Open rewards: ``reward`` takes a registry name or an import path to a TRL-style function, several rewards
combine with weights, and ``None`` ("not applicable") is left out of the group mean / std (advantage 0) instead of
counting as 0.0. The user reward below is defined in this test module and reaches the module through the YAML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from rerule_lightning.cli.commands import main
from rerule_lightning.cli.lightning_cli import lightning_main
from rerule_lightning.rl.grpo import group_advantages
from rerule_lightning.rl.reward_contract import RewardContract
from rerule_lightning.rl.rewards import WeightedReward, build_reward, rule_reward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"
CALLS: list[dict[str, Any]] = []
OUTPUTS: list[dict[str, Any]] = []
RETURNED: list[list[float | None]] = []
METRICS: list[dict[str, float]] = []


def brevity(completion: str, label: str) -> float | None:
    """Not applicable to forget prompts nor to completions of 4 words or more; else a tenth of the length."""
    return None if label == "forget" or len(completion.split()) >= 4 else len(completion) / 10


def boundary_brevity(prompts: list[str], completions: list[str], label: list[str], **columns: Any
                     ) -> list[float | None]:
    """A user reward with the TRL contract (:func:`brevity` per item; ``label`` is the batch's own column)."""
    CALLS.append({"n": len(completions), "labels": list(label), "columns": sorted(columns)})
    RETURNED.append([brevity(c, lab) for c, lab in zip(completions, label)])
    return RETURNED[-1]


class Record(L.Callback):
    """Keeps each step's outputs (the groups carry rewards and advantages)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        OUTPUTS.append(outputs)
        METRICS.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_masked_advantages_by_hand() -> None:
    r = torch.tensor([[1.0, 0.0, 9.0, 1.0], [0.5, 7.0, 7.0, 7.0], [2.0, 2.0, 2.0, 2.0]])
    ok = torch.tensor([[True, True, False, True], [True, False, False, False], [False] * 4])
    adv = group_advantages(r, "group", eps=0.0, applicable=ok)
    # row 0 over (1, 0, 1): mean 2/3, Bessel std sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[0], torch.tensor([(1 / 3) / s, (-2 / 3) / s, 0.0, (1 / 3) / s]))
    assert adv[1].tolist() == [0.0] * 4 and adv[2].tolist() == [0.0] * 4  # one or no applicable reward
    # all applicable: exactly the unmasked computation
    full = torch.ones_like(ok)
    assert torch.equal(group_advantages(r, "group", applicable=full), group_advantages(r, "group"))
    # batch scale: centred per group, divided by the std of the 4 applicable rewards (1, 0, 1, 0.5)
    b = group_advantages(r, "batch", eps=0.0, applicable=ok)
    std = torch.tensor([1.0, 0.0, 1.0, 0.5]).std()
    torch.testing.assert_close(b[0], torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3]) / std)
    # a NaN reward that applies is a non-finite input, not "not applicable": it still poisons its group
    assert torch.isnan(group_advantages(torch.tensor([[float("nan"), 1.0]]), "group",
                                        applicable=torch.tensor([[True, False]]))).sum() == 0
    assert torch.isnan(group_advantages(torch.tensor([[float("nan"), 1.0, 0.0]]), "group",
                                        applicable=torch.tensor([[True, True, False]]))).all()


def test_weighted_rewards_skip_none_and_name_bad_entries() -> None:
    combined = RewardContract(["refusal", "test_open_rewards:boundary_brevity"], [2.0, 0.5])
    total, per = combined.score(prompts=["p"] * 3, completions=["I'm sorry, I can't help with that.", "Paris",
                                                                  "a b c d e"], label=["forget", "boundary", "boundary"])
    assert total == [2.0, 0.25, 0.0]  # forget: 2 x refusal + brevity n/a; boundary: 2 x 0 + 0.5 x (0.5 | n/a)
    assert per == {"refusal": [1.0, 0.0, 0.0], "boundary_brevity": [None, 0.5, None]}
    only = RewardContract("test_open_rewards.boundary_brevity")
    assert only(prompts=["p", "p"], completions=["x", "y z w"], label=["forget", "boundary"]) == [None, 0.5]
    legacy = build_reward(["refusal", "test_open_rewards:boundary_brevity"], [2.0, 0.5])  # the positional helper
    assert isinstance(legacy, WeightedReward) and build_reward("rule") is rule_reward
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        RewardContract("no_such_module:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        RewardContract("test_open_rewards:nope")
    with pytest.raises(ValueError, match="reward_weights has 1 weights but there are 2 rewards"):
        RewardContract(["rule", "refusal"], [1.0])


def test_bad_reward_path_in_yaml_is_one_line_error(tiny_prepared: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    overlay = tmp_path / "r.yaml"
    overlay.write_text("model:\n  init_args:\n    reward: [rule_fact, mypkg.rewards:missing]\n")
    links = tiny_prepared["links"]  # real paths, so that the reward is what the error is about
    assert main(["fit", "--config", str(RULE), "--config", str(overlay), "--trainer.logger", "false",
                 "--model.init_args.policy.name_or_path", links["target"], "--data.init_args.world_dir",
                 links["world"], "--model.init_args.export_dir", "null",
                 "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rerule: error:") and "cannot import module 'mypkg.rewards'" in err


def test_user_reward_from_yaml_with_not_applicable_items(tiny_prepared: dict, tmp_path: Path) -> None:
    for record in (CALLS, OUTPUTS, RETURNED, METRICS):
        record.clear()
    links = tiny_prepared["links"]
    overlay = tmp_path / "user_reward.yaml"
    overlay.write_text("model:\n  init_args:\n    reward: test_open_rewards:boundary_brevity\n"
                       "trainer:\n  callbacks:\n    - class_path: test_open_rewards.Record\n")
    lightning_main(["fit", "--config", str(RULE), "--config", str(overlay),
                    "--model.init_args.policy.name_or_path", links["target"], "--data.init_args.world_dir",
                    links["world"], "--data.init_args.batch_size", "4", "--model.init_args.num_generations", "4",
                    "--model.init_args.max_new_tokens", "6", "--model.init_args.temperature", "2.0",
                    "--model.init_args.export_dir", "null", "--trainer.max_steps", "1", "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.default_root_dir", str(tmp_path / "run")])
    assert len(CALLS) == 2 and CALLS[0]["n"] == 2 and CALLS[1]["n"] == 16  # the preflight's probe, then step 0
    applies = [v is not None for v in RETURNED[1]]
    metrics = METRICS[0]
    assert metrics["train/reward_applicable_frac"] == pytest.approx(sum(applies) / 16)
    assert metrics["train/reward_applicable_mean"] == pytest.approx(
        sum(v for v in RETURNED[1] if v is not None) / sum(applies), rel=1e-6)
    # TRL's keywords and the batch's columns under their own names, nothing renamed
    assert set(CALLS[1]["columns"]) == {"completion_ids", "trainer_state", "id", "question", "kind", "reference",
                                        "target", "value"}
    groups = OUTPUTS[0]["groups"]
    assert {g.label for g in groups} == {"forget", "boundary"}
    differs = 0
    for grp in groups:
        ok = torch.tensor([brevity(c, grp.label) is not None for c in grp.completions])
        masked = group_advantages(grp.rewards[None].float(), applicable=ok[None])[0]
        torch.testing.assert_close(grp.advantages.float(), masked)  # n/a entries: out of mean / std, advantage 0
        assert torch.equal(grp.advantages[~ok], torch.zeros(int((~ok).sum())))
        differs += not torch.allclose(masked, group_advantages(grp.rewards[None].float())[0])
    assert differs, "no group mixed applicable and n/a rewards: the test would not tell None from 0.0"

