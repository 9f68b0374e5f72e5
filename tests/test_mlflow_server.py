"""A RULE fit logging to a real ``mlflow server`` (artifacts proxied through the server), read back with
``MlflowClient``: scoped metric keys, flattened params, the resolved config artifact, run status."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from rerule_lightning.cli.commands import main

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"
STARTUP_TIMEOUT_S = 180  # generous: the first start migrates a fresh sqlite store, and CI machines are shared
METRIC_KEY = re.compile(r"^[a-z0-9_/.]+$")




def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_executable() -> str:
    local = Path(sys.executable).with_name("mlflow")
    found = str(local) if local.exists() else shutil.which("mlflow")
    if not found:
        pytest.fail("the mlflow command is not installed next to this Python")
    return found


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return members


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [_mlflow_executable(), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    pgid = proc.pid  # start_new_session: the server leads its own process group
    tracked: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before answering /health:\n"
                            f"{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {url}/health within {STARTUP_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            parent = psutil.Process(proc.pid)
            tracked = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            tracked = []
        tracked += _group_members(pgid)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _, still = psutil.wait_procs([p for p in tracked if p.pid != proc.pid], timeout=10)
        if still or proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
            psutil.wait_procs(still, timeout=5)
        survivors = _alive(tracked) + _alive(_group_members(pgid))
        assert not survivors, f"mlflow server processes survived teardown: {survivors}"


def test_rule_fit_logs_to_a_real_mlflow_server(mlflow_server: str, tiny_prepared: dict, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    run_name = f"server-test-{os.getpid()}"
    rc = main(["fit", "--config", str(RULE),
               "--model.init_args.policy.name_or_path", tiny_prepared["links"]["target"],
               "--data.init_args.world_dir", tiny_prepared["links"]["world"],
               "--data.init_args.batch_size", "4", "--model.init_args.num_generations", "4",
               "--model.init_args.max_new_tokens", "8", "--model.init_args.export_dir", str(tmp_path / "export"),
               "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--trainer.default_root_dir", str(tmp_path / "logs"),
               "--trainer.logger.init_args.tracking_uri", mlflow_server,
               "--trainer.logger.init_args.run_name", run_name])
    assert rc == 0

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("rerule")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"

    metrics = run.data.metrics
    for key in ("train/reward", "train/loss", "train/completion_length"):
        assert key in metrics, sorted(metrics)
    bad = sorted(k for k in metrics if not METRIC_KEY.match(k))
    assert not bad, f"metric keys outside ^[a-z0-9_/.]+$: {bad}"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(run.info.run_id, "train/reward"))

    params = run.data.params
    gen_keys = [k for k in params if k.endswith("model.init_args.num_generations")]
    assert gen_keys and all(params[k] == "4" for k in gen_keys), sorted(params)
    assert any(k.endswith("model.init_args.policy.name_or_path") for k in params)
    assert any(k.endswith("data.init_args.batch_size") and params[k] == "4" for k in params)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts, artifacts
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    config = yaml.safe_load(Path(local).read_text())
    assert config["model"]["class_path"] == "rerule_lightning.GRPOUnlearningModule"  # the short path the YAML uses
    assert config["model"]["init_args"]["num_generations"] == 4
    assert config["trainer"]["max_steps"] == 3
    assert config["trainer"]["logger"]["init_args"]["tracking_uri"] == mlflow_server
    assert not (tmp_path / "mlflow.db").exists(), "the run went to the default sqlite store, not the server"
