"""Truthful endings: ``rerule fit`` stopped by SIGTERM / SIGINT (a real subprocess started with ``Popen``) exits
143 / 130 with one line naming the last checkpoint, the MLflow run is KILLED, and resuming from the named
checkpoint finishes the run; a signal that interrupts a checkpoint write ends with the same one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rerule_lightning.primitives.checkpointing import validate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"
MAX_STEPS = 4
TIMEOUT_S = 180

SLOW_CALLBACK = '''
import time
import lightning as L


class Slow(L.Callback):
    """Leaves time to signal the run between two steps (sleeping changes no result)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.5)
'''


def fit_command(tiny_prepared: dict, tmp: Path, name: str, ckpt: str | None = None) -> list[str]:
    overlay = tmp / f"{name}.yaml"
    overlay.write_text(textwrap.dedent(f"""\
        trainer:
          enable_checkpointing: true
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {tmp / name / 'ckpt'}, every_n_train_steps: 1, save_last: true}}
            - class_path: slow_callback.Slow
        """))
    links = tiny_prepared["links"]
    cmd = [sys.executable, "-m", "rerule_lightning.cli", "fit", "--config", str(RULE), "--config", str(overlay),
           "--model.init_args.policy.name_or_path", links["target"], "--data.init_args.world_dir", links["world"],
           "--data.init_args.batch_size", "2", "--model.init_args.num_generations", "2",
           "--model.init_args.max_new_tokens", "4", "--model.init_args.export_dir", "null",
           "--trainer.max_steps", str(MAX_STEPS), "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp / name),
           "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    return cmd + (["--ckpt_path", ckpt] if ckpt else [])


def env_for(tmp: Path) -> dict[str, str]:
    (tmp / "slow_callback.py").write_text(SLOW_CALLBACK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RERULE_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RERULE_DEBUG", None)
    return env


def signal_after_first_checkpoint(cmd: list[str], env: dict[str, str], tmp: Path, name: str,
                                  sig: signal.Signals) -> tuple[int, str]:
    """Start ``cmd`` (``Popen``, not a shell job), send ``sig`` once ``last.ckpt`` exists: (status, stderr)."""
    last, log = tmp / name / "ckpt" / "last.ckpt", tmp / f"{name}.err"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not last.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint before the run ended (status {proc.returncode}):\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(sig)
        status = proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return status, log.read_text()


def run_statuses(db: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(exps, order_by=["attributes.start_time ASC"])]


@pytest.mark.slow
def test_sigterm_and_sigint_exit_non_zero_naming_the_checkpoint_and_resume(tiny_prepared: dict,
                                                                            tmp_path: Path) -> None:
    env = env_for(tmp_path)
    named = {}
    for i, (sig, status) in enumerate(((signal.SIGTERM, 143), (signal.SIGINT, 130))):
        name = sig.name.lower()
        rc, err = signal_after_first_checkpoint(fit_command(tiny_prepared, tmp_path, name), env, tmp_path, name, sig)
        assert rc == status, f"{sig.name}: exit status {rc}:\n{err[-3000:]}"
        lines = [ln for ln in err.splitlines() if ln.startswith("rerule:")]
        assert len(lines) == 1, err[-3000:]
        m = re.fullmatch(rf"rerule: stopped by {sig.name} at step (\d+): last checkpoint (\S+) "
                         r"\(resume with --ckpt_path (\S+)\)", lines[0])
        assert m and m.group(2) == m.group(3), lines[0]
        assert lines[0] == err.strip().splitlines()[-1], "the ending line is not the last line"
        assert "Traceback" not in err, err[-3000:]
        ckpt = validate_checkpoint(m.group(2))
        assert Path(m.group(2)).parent == tmp_path / name / "ckpt"
        assert 1 <= ckpt["global_step"] <= int(m.group(1)) < MAX_STEPS
        assert run_statuses(tmp_path / "mlflow.db")[i] == "KILLED"
        named[name] = m.group(2)
    # resuming from the checkpoint the line named finishes the run
    done = subprocess.run(fit_command(tiny_prepared, tmp_path, "sigterm", ckpt=named["sigterm"]), env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert validate_checkpoint(str(tmp_path / "sigterm" / "ckpt" / "last.ckpt"))["global_step"] == MAX_STEPS
    assert run_statuses(tmp_path / "mlflow.db") == ["KILLED", "KILLED", "FINISHED"]


def test_a_signal_during_a_checkpoint_write_ends_with_the_same_line(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """torch.save turns the KeyboardInterrupt of a SIGINT into a ``RuntimeError`` (the old traceback)."""
    from rerule_lightning.cli import commands as cli

    def fit_interrupted_while_saving(argv: list[str]) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt as err:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file") \
                from err

    monkeypatch.setattr(cli, "lightning_main", fit_interrupted_while_saving)
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["fit"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "rerule: stopped by SIGINT: no checkpoint was saved, nothing to resume from"
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored


def test_the_run_is_marked_failed_when_the_logger_cannot_write_its_files(tmp_path: Path) -> None:
    """``finalize`` must still mark the run when ``run.json`` cannot be written (e.g. the root dir is a file)."""
    from rerule_lightning.tracking.logger import ResilientMLFlowLogger

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    logger = ResilientMLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", local_dir=str(blocker / "x"))
    _ = logger.run_id  # the run exists (RUNNING)
    logger.finalize("failed")
    assert run_statuses(tmp_path / "mlflow.db") == ["FAILED"]


def test_a_sigint_during_a_fit_loop_stops_the_trainer_and_ends_with_the_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Python may run the SIGINT handler inside a GC finalizer, which prints and drops a KeyboardInterrupt
    ("Exception ignored in ..."; seen in a loaded suite: the run went on and finished with status 0). While a fit
    loop runs the handler sets ``trainer.should_stop`` instead of raising, and the command still ends with status
    130 and the one line."""
    from types import SimpleNamespace

    from rerule_lightning.cli import commands as cli
    from rerule_lightning.cli import interrupts

    trainer = SimpleNamespace(training=True, should_stop=False, global_step=3, checkpoint_callbacks=[], loggers=[])
    seen = {}

    def fit_loop(argv: list[str]) -> None:
        interrupts.watch_trainer(trainer)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop is asked to stop at the batch end
        time.sleep(0.2)
        seen["should_stop"] = trainer.should_stop

    monkeypatch.setattr(cli, "lightning_main", fit_loop)
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    assert cli.main(["fit"]) == 130
    assert seen == {"should_stop": True}
    assert capsys.readouterr().err.strip() == \
        "rerule: stopped by SIGINT at step 3: no checkpoint was saved, nothing to resume from"
