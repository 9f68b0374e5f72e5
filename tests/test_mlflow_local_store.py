"""A local sqlite MLflow store keeps its artifacts in ``mlartifacts/`` beside the database, never in ``./mlruns``
of the working directory; a checkpoint of another model is refused before any MLflow run exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bad_input import Env, _other_model
from test_safe_loading import tiny_checkpoint

from rerule_lightning.cli.commands import main
from rerule_lightning.tracking.logger import ARTIFACT_DIR, default_artifact_location

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"


def _fit(tiny_prepared: dict, out: Path, uri: str, *extra: str) -> int:
    links = tiny_prepared["links"]
    return main(["fit", "--config", str(RULE), "--model.init_args.policy.name_or_path", links["target"],
                 "--data.init_args.world_dir", links["world"], "--data.init_args.batch_size", "2",
                 "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4",
                 "--model.init_args.export_dir", "null", "--trainer.max_steps", "1",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(out / "logs"),
                 "--trainer.logger.init_args.tracking_uri", uri, *extra])


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_default_artifact_location() -> None:
    assert default_artifact_location("sqlite:////data/mlflow.db", "rerule") == f"/data/{ARTIFACT_DIR}/rerule"
    assert default_artifact_location("sqlite:///mlflow.db", "a b/c") == str(Path.cwd() / ARTIFACT_DIR / "a_b_c")
    for uri in ("http://127.0.0.1:5000", "file:./mlruns", "sqlite:///:memory:", None):
        assert default_artifact_location(uri, "rerule") is None


@pytest.mark.slow
def test_sqlite_fit_keeps_artifacts_beside_the_database(tiny_prepared: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    store.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert _fit(tiny_prepared, tmp_path, uri) == 0
    assert list(cwd.iterdir()) == [], f"the run wrote into the working directory: {list(cwd.iterdir())}"
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED"
    root = store / ARTIFACT_DIR / "rerule"
    assert MlflowClient(tracking_uri=uri).get_experiment(run.info.experiment_id).artifact_location == str(root)
    config = root / run.info.run_id / "artifacts" / "config.yaml"
    assert config.is_file() and "num_generations: 2" in config.read_text()


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_before_any_run(tiny_prepared: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    real = tiny_checkpoint(tiny_prepared, tmp_path / "real", steps=1)
    other = tmp_path / "other.ckpt"
    _other_model(Env(world="", target="", ckpt=real, tmp=tmp_path), other)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    capsys.readouterr()
    assert _fit(tiny_prepared, tmp_path / "out", uri, "--ckpt_path", str(other)) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{other}' is from a different model than the configured one" in err
    assert _runs(uri) == [], "an MLflow run was created for a refused checkpoint"
    assert not list(tmp_path.rglob("config.yaml")) and not (tmp_path / ARTIFACT_DIR).exists()
