"""Tracking-server faults with a real ``mlflow server`` on 127.0.0.1: unreachable at start -> clear error before
training; killed mid-run -> training finishes, metrics kept in a local CSV with a re-log command; a run that
raises is marked FAILED, never FINISHED."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_mlflow_server import _free_port, mlflow_server  # noqa: F401 - the fixture (one server per module)

from rerule_lightning.cli.commands import main
from rerule_lightning.tracking.logger import relog_metrics

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"


def fit_args(tiny_prepared: dict, tmp_path: Path, uri: str, run_name: str, steps: int = 3) -> list[str]:
    links = tiny_prepared["links"]
    return ["fit", "--config", str(RULE), "--model.init_args.policy.name_or_path", links["target"],
            "--data.init_args.world_dir", links["world"], "--data.init_args.batch_size", "2",
            "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4",
            "--model.init_args.export_dir", str(tmp_path / "export"), "--trainer.max_steps", str(steps),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp_path / "logs"),
            "--trainer.logger.init_args.tracking_uri", uri, "--trainer.logger.init_args.run_name", run_name]


def run_of(uri: str, run_name: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rerule")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, runs
    return runs[0]


def kill_server(url: str) -> None:
    """SIGKILL the whole process group of the server listening on ``url``'s port."""
    port = url.rsplit(":", 1)[1]
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "server" in cmd and "--port" in cmd and port in cmd:
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
            psutil.wait_procs([p], timeout=10)
            return
    raise AssertionError(f"no mlflow server process found for {url}")


def test_unreachable_server_fails_before_training(tiny_prepared: dict, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    rc = main(fit_args(tiny_prepared, tmp_path, uri, "never"))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"MLflow tracking server {uri} is not reachable" in err and "nothing was trained" in err
    assert "--trainer.logger.init_args.tracking_uri" in err and "Traceback" not in err
    assert not (tmp_path / "export").exists() and not (tmp_path / "logs").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_run_that_raises_is_marked_failed(mlflow_server: str, tiny_prepared: dict,  # noqa: F811
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rerule_lightning.modules.grpo as grpo_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grpo_module, "RewardContract", lambda *a, **k: lambda **kw: [float("nan")] * len(kw["prompts"]))
    rc = main(fit_args(tiny_prepared, tmp_path, mlflow_server, "raises")
              + ["--model.init_args.max_consecutive_nonfinite", "2"])
    assert rc == 1  # the CLI reports the NonFiniteError as one `rerule: error:` line
    run = run_of(mlflow_server, "raises")
    assert run.info.status == "FAILED"
    local = json.loads((tmp_path / "logs" / run.info.experiment_id / run.info.run_id / "run.json").read_text())
    assert local["status"] == "FAILED" and local["mlflow_outage"] is None
    assert not (tmp_path / "export").exists(), "a failed fit exported a model"


def test_server_killed_mid_run_training_finishes_and_metrics_are_kept(
        mlflow_server: str, tiny_prepared: dict, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Runs last in this module: it kills the module's server."""
    from rerule_lightning.modules.grpo import GRPOUnlearningModule

    def kill_after_second_step(self: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step == 2:
            kill_server(mlflow_server)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(GRPOUnlearningModule, "on_train_batch_end", kill_after_second_step, raising=False)
    caplog.set_level(logging.WARNING, logger="rerule_lightning.tracking.logger")
    rc = main(fit_args(tiny_prepared, tmp_path, mlflow_server, "outage", steps=5))
    assert rc == 0
    assert (tmp_path / "export" / "config.json").exists(), "training did not run to the end"

    csvs = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(csvs) == 1
    rows = list(csv.DictReader(open(csvs[0])))
    run_id = rows[0]["run_id"]
    assert sorted({int(r["step"]) for r in rows if r["key"] == "train/loss"}) == [0, 1, 2, 3, 4]
    local = json.loads((csvs[0].parent / "run.json").read_text())
    assert local["status"] == "FINISHED" and "Error" in local["mlflow_outage"]

    text = caplog.text
    assert str(csvs[0]) in text
    command = f"python -m rerule_lightning.tracking.logger relog {csvs[0]} --tracking_uri {mlflow_server} --run_id {run_id}"
    assert command in text, text

    # the re-log path works (here into a local store, the server being gone)
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'relog.db'}"
    client = MlflowClient(tracking_uri=store)
    target = client.create_run(client.create_experiment("relog")).info.run_id
    _, n = relog_metrics(str(csvs[0]), store, run_id=target)
    assert n == len(rows)
    history = client.get_metric_history(target, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert client.get_run(target).info.status == "FINISHED"  # from run.json


def test_trainer_built_by_the_cli_and_run_directly_keeps_its_csv_under_default_root_dir(
        tiny_prepared: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lightning_main(run=False)` + `trainer.fit` (as benchmarks do) binds the logger too: nothing lands in cwd."""
    from rerule_lightning.cli.commands import lightning_main
    from tests.test_cli_configs import RULE, _rule_overrides

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cli = lightning_main(["fit", "--config", str(RULE), *_rule_overrides(tiny_prepared, tmp_path),
                          "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                          "--trainer.enable_progress_bar", "false", "--model.init_args.export_dir", "null"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    logger = cli.trainer.logger
    expected = tmp_path / "logs" / str(logger.experiment_id) / str(logger.run_id) / "metrics.csv"
    assert Path(logger.csv_path) == expected and expected.is_file()
    # nothing in the working directory: the sqlite store's artifacts live beside it (not MLflow's ./mlruns)
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())
    assert list((tmp_path / "mlartifacts" / "rerule" / str(logger.run_id)).glob("artifacts/config.yaml"))
    assert not list(cwd.glob(f"{logger.experiment_id}/**/metrics.csv"))
