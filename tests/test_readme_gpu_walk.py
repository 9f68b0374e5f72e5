"""README's GPU section walks an 8 B TOFU run (RS -> RULE -> eval -> merged export) in commands that exist: every
``rerule`` command of that block parses and instantiates (no weights loaded), and chains stage to stage (each
stage starts from the directory the previous one exports to)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rerule_lightning.cli.commands import lightning_main

ROOT = Path(__file__).resolve().parents[1]


def _walk_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("**An 8 B TOFU run, RS → RULE → eval → merged export**")
    block = text[text.index("```bash", start) + len("```bash"): text.index("```", text.index("```bash", start) + 7)]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line.split("#")[0])[1:] for line in joined.splitlines() if line.strip().startswith("rerule ")]


def test_the_walk_has_three_stages_and_a_merged_export() -> None:
    cmds = _walk_commands()
    assert [c[0] for c in cmds] == ["fit", "fit", "test"]
    assert "--model.init_args.export.merge" in cmds[1]


def test_every_walk_command_instantiates_and_the_stages_chain(no_weight_loading: None, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the README's relative config paths
    clis = [lightning_main([*c, "--trainer.logger", "false"], run=False) for c in _walk_commands()]
    rs, rule, ev = (c.model for c in clis)
    assert rs.hparams.export_dir == rule.policy_cfg.name_or_path  # RULE starts from the RS export
    assert rule.export_cfg.merge is True and rule.policy_cfg.peft == "qlora"
    assert ev.policy_cfg.name_or_path == rule.hparams.export_dir  # eval reads the merged RULE export
    assert "8B" in rs.policy_cfg.name_or_path and "8B" in ev.hparams.eval_reference
