"""The ``rerule`` commands pin torch's intra-op thread count (``--threads``, else ``$RERULE_THREADS``, else
``$OMP_NUM_THREADS``, else 2), so that a run repeats exactly on the same machine; ``rerule demo`` passes the
count on to every stage."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rerule_lightning.cli.commands import main
from rerule_lightning.cli.lightning_cli import DEFAULT_THREADS, resolve_threads

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"
PREPARE = ROOT / "configs" / "embedded" / "prepare.yaml"


@pytest.fixture
def clean_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No thread variables set; torch's count and the variables restored afterwards."""
    before = torch.get_num_threads()
    for k in ("RERULE_THREADS", "OMP_NUM_THREADS", "RERULE_DEBUG"):
        monkeypatch.delenv(k, raising=False)  # restored (also when the CLI sets it) at teardown
    yield
    torch.set_num_threads(before)


def _fit_that_stops_in_preflight(tmp_path: Path, *extra: str) -> int:
    """``rerule fit`` through the whole CLI path up to the preflight checks (a missing world stops it there)."""
    return main(["fit", "--config", str(RULE), *extra, "--data.init_args.world_dir", str(tmp_path / "no-world"),
                 "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "logs")])


def test_resolution_order(clean_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_threads(None) == DEFAULT_THREADS == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3
    monkeypatch.setenv("RERULE_THREADS", "1")
    assert resolve_threads(None) == 1
    assert resolve_threads(4) == 4 and resolve_threads("0") == 0
    with pytest.raises(ValueError, match=r"\$RERULE_THREADS=x: expected an integer >= 0"):
        monkeypatch.setenv("RERULE_THREADS", "x")
        resolve_threads(None)


def test_fit_flag_sets_the_thread_count(clean_threads: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    assert _fit_that_stops_in_preflight(tmp_path, "--threads", "3") == 2
    assert "no-world" in capsys.readouterr().err  # it got as far as the preflight checks
    assert torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3"  # for the processes it starts (DDP ranks)


def test_fit_default_and_environment(clean_threads: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    assert _fit_that_stops_in_preflight(tmp_path) == 2
    assert torch.get_num_threads() == DEFAULT_THREADS
    monkeypatch.setenv("RERULE_THREADS", "1")
    assert _fit_that_stops_in_preflight(tmp_path) == 2
    assert torch.get_num_threads() == 1


def test_pinned_count_is_in_the_logged_config(clean_threads: None, no_weight_loading: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from rerule_lightning.cli.lightning_cli import lightning_main

    monkeypatch.chdir(tmp_path)
    cli = lightning_main(["fit", "--config", str(RULE), "--trainer.logger", "false"], run=False)
    assert cli.config.fit.threads == DEFAULT_THREADS  # what MLflowSaveConfigCallback logs
    cli = lightning_main(["fit", "--config", str(RULE), "--trainer.logger", "false", "--threads=1"], run=False)
    assert cli.config.fit.threads == 1 and torch.get_num_threads() == 1


def test_bad_value_is_one_error_line(clean_threads: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _fit_that_stops_in_preflight(tmp_path, "--threads", "-1") == 2
    err = capsys.readouterr().err
    assert "rerule: error: --threads=-1: expected an integer >= 0" in err
    assert main(["prepare", "--config", str(PREPARE), "--threads", "two"]) == 2
    assert "rerule: error: --threads=two: expected an integer >= 0" in capsys.readouterr().err


def test_prepare_flag_sets_the_thread_count(clean_threads: None, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--config", str(PREPARE), "--threads", "3", "--print_config"])
    assert info.value.code in (0, None) and torch.get_num_threads() == 3
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "--threads N" in capsys.readouterr().out


def test_demo_passes_the_count_on_to_every_stage(clean_threads: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import rerule_lightning.cli.lightning_cli as lightning_cli
    import rerule_lightning.cli.prepare as prepare
    import rerule_lightning.cli.report as report

    calls: list[list[str]] = []

    def stage(argv: list[str], run: bool = True) -> Any:
        calls.append(argv)
        assert torch.get_num_threads() == 3
        trainer = SimpleNamespace(logger=SimpleNamespace(run_id="run"),
                                  callback_metrics={"forget/refusal_rate": torch.tensor(1.0)})
        return SimpleNamespace(trainer=trainer)

    monkeypatch.setattr(lightning_cli, "lightning_main", stage)
    monkeypatch.setattr(prepare, "prepare_main", lambda argv: calls.append(["prepare", *argv]) or 0)
    monkeypatch.setattr(report, "tag_unit", lambda *a, **k: None)
    (tmp_path / "out" / "seed0").mkdir(parents=True)  # what the stages would have created
    torch.set_num_threads(1)
    assert main(["demo", "--threads", "3", "--output_dir", str(tmp_path / "out"), "--seeds", "[0]",
                 "--cache_dir", str(tmp_path / "cache")]) == 0
    # prepare, then fit and test of rejection steering, RULE and ReRULE
    assert [c[0] for c in calls] == ["prepare", "fit", "test", "fit", "test", "fit", "test"]
    for argv in calls:
        i = argv.index("--threads")
        assert argv[i + 1] == "3", argv
