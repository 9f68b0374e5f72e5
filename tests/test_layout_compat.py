"""What a user wrote before the core moved into layer folders still works: the old module paths import (as the
same module objects), a YAML ``class_path`` through an old path builds the same class, and a checkpoint written
by the code before the move (``tests/fixtures/legacy/``: a ReRULE ``hard_case.yaml`` fit of the tiny world,
saved at step 2 by commit 2e58f1c) resumes through ``rerule fit --ckpt_path``."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path
from typing import Any

import pytest

import rerule_lightning
from rerule_lightning.primitives.checkpointing import safe_load

ROOT = Path(__file__).resolve().parents[1]
LEGACY_CKPT = ROOT / "tests" / "fixtures" / "legacy" / "grpo_hard_case_step2.ckpt"
RULE = ROOT / "configs" / "embedded" / "rule.yaml"
HARD_CASE = ROOT / "configs" / "replay" / "hard_case.yaml"


@pytest.mark.parametrize("old", sorted(rerule_lightning.MOVED))
def test_an_old_module_path_is_the_moved_module(old: str) -> None:
    before = importlib.import_module(f"rerule_lightning.{old}")
    now = importlib.import_module(f"rerule_lightning.{rerule_lightning.MOVED[old]}")
    assert before is now
    assert now.__name__ == f"rerule_lightning.{rerule_lightning.MOVED[old]}"  # never re-executed under the old name


def test_submodules_of_an_old_package_path_are_not_loaded_twice() -> None:
    from rerule_lightning.metrics.functional import truth_ratio

    from rerule_lightning.evaluation.metrics import functional

    assert truth_ratio is functional.truth_ratio


def test_old_names_of_the_two_packages_that_kept_their_names() -> None:
    from rerule_lightning.cli import lightning_main, main  # the old rerule_lightning/cli.py
    from rerule_lightning.cli.commands import lightning_main as lm
    from rerule_lightning.cli.commands import main as m
    from rerule_lightning.tracking import ResilientMLFlowLogger  # the old rerule_lightning/tracking.py
    from rerule_lightning.tracking.logger import ResilientMLFlowLogger as R

    assert (main, lightning_main, ResilientMLFlowLogger) == (m, lm, R)
    import rerule_lightning.cli

    with pytest.raises(AttributeError, match="'rerule_lightning.cli' has no attribute 'nope'"):
        rerule_lightning.cli.nope  # noqa: B018


def test_a_yaml_class_path_through_an_old_module_path_builds_the_same_class(tmp_path: Path) -> None:
    from rerule_lightning.cli.lightning_cli import lightning_main
    from rerule_lightning.modules.grpo import GRPOUnlearningModule

    cfg = tmp_path / "old_paths.yaml"
    cfg.write_text(textwrap.dedent("""\
        model:
          class_path: rerule_lightning.grpo_module.GRPOUnlearningModule
          init_args:
            policy: {name_or_path: /nonexistent/model}
        """))
    cli = lightning_main(["fit", "--config", str(RULE), "--config", str(cfg), "--trainer.logger", "false"], run=False)
    assert type(cli.model) is GRPOUnlearningModule


def _overrides(tiny: dict, tmp: Path, steps: int) -> list[str]:
    links = tiny["links"]
    overlay = tmp / "ckpt.yaml"
    overlay.write_text(textwrap.dedent(f"""\
        trainer:
          enable_checkpointing: true
          logger: false
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {tmp / 'ckpt'}, every_n_train_steps: 1, save_top_k: -1}}
        """))
    return ["--config", str(overlay), "--config", str(HARD_CASE),
            "--trainer.callbacks.init_args.reward_threshold", "1.0",
            "--trainer.callbacks.init_args.require_variance", "false",
            "--trainer.callbacks.init_args.collect_steps", "1",
            "--model.init_args.policy.name_or_path", links["target"], "--data.init_args.world_dir", links["world"],
            "--data.init_args.batch_size", "4", "--model.init_args.num_generations", "4",
            "--model.init_args.max_new_tokens", "6", "--model.init_args.temperature", "2.0",
            "--model.init_args.learning_rate", "0.001", "--model.init_args.export_dir", "null",
            "--data.init_args.epoch_length", "4", "--data.init_args.eval_splits", "[forget]",
            "--data.init_args.eval_max_items", "4", "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp)]


@pytest.mark.slow
def test_a_checkpoint_written_before_the_move_resumes(tiny_prepared: dict, tmp_path: Path,
                                                      one_torch_thread: Any) -> None:
    from rerule_lightning.cli.commands import main

    legacy = safe_load(str(LEGACY_CKPT))
    assert legacy["global_step"] == 2 and legacy["hyper_parameters"]["_class_path"] == \
        "rerule_lightning.GRPOUnlearningModule"
    rc = main(["fit", "--config", str(RULE), *_overrides(tiny_prepared, tmp_path, 3), "--ckpt_path", str(LEGACY_CKPT)])
    assert rc == 0
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=0-step=3.ckpt"]  # one step after the legacy step 2, nothing before it
    resumed = safe_load(str(saved[0]))
    assert resumed["global_step"] == 3
    old_cb, new_cb = legacy["callbacks"]["HardCaseReplayCallback"], resumed["callbacks"]["HardCaseReplayCallback"]
    assert new_cb["seed"] == old_cb["seed"] and new_cb["collect_end"] == old_cb["collect_end"]
    assert set(new_cb["totals"]) == set(old_cb["totals"])
    assert all(new_cb["totals"][k] >= v for k, v in old_cb["totals"].items())  # counters carried on, not reset
    old_sd, new_sd = legacy["state_dict"], resumed["state_dict"]
    assert set(old_sd) == set(new_sd)
    assert any(not (old_sd[k] == new_sd[k]).all() for k in old_sd)  # the third step trained from the loaded weights
