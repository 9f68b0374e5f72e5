"""MLflow integration: the resolved config as a run artifact, flattened params, run status, and faults.

* :func:`check_reachable`: the CLI checks a tracking server answers before anything is trained.
* :func:`default_artifact_location`: a local ``sqlite:///`` store keeps its artifacts in ``mlartifacts/``
  beside the database file (MLflow's own default, ``./mlruns``, is relative to the working directory).
* :class:`ResilientMLFlowLogger` (the CLI's default logger) keeps every metric in a local CSV beside the
  checkpoints and carries on when the server dies mid-run; :func:`relog_metrics` /
  ``python -m rerule_lightning.tracking.logger relog CSV --tracking_uri URI`` puts them on the server afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts / lists into ``a.b.c`` keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config next to the run (as Lightning does) and, under MLflow, logs it as the
    artifact ``config.yaml`` and its flattened values as params."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:  # a CLI-built trainer run directly (run=False) was never bound
            if isinstance(logger, ResilientMLFlowLogger) and logger._root_dir is None and logger.local_dir is None:
                logger.bind(trainer)
        if self.already_saved:
            return
        if trainer.log_dir is not None:
            return super().setup(trainer, pl_module, stage)
        # MLflow with a database or server URI has no local log dir: keep a copy under default_root_dir.
        if trainer.is_global_zero:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            path = os.path.join(trainer.default_root_dir, self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, MLFlowLogger) or getattr(logger, "offline_reason", None):
                continue
            try:
                self._log_config(logger)
            except Exception as err:  # noqa: BLE001 - a server outage must not stop training
                if not isinstance(logger, ResilientMLFlowLogger):
                    raise
                logger._go_offline("logging the config", err)

    def _log_config(self, logger: MLFlowLogger) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        logger.experiment.log_text(logger.run_id, text, "config.yaml")
        cfg = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
        params = {k: v for k, v in flatten(cfg).items() if not k.startswith("config")}
        logger.log_hyperparams(params)


# ------------------------------------------------------------------------------------------- faults
#: Bounded HTTP retries for a remote server (MLflow's defaults retry for minutes). Set only if unset.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
CSV_FIELDS = ("run_id", "step", "key", "value", "timestamp_ms")


def is_remote(uri: str | None) -> bool:
    """Whether ``uri`` is an HTTP(S) tracking server (as opposed to a local file / sqlite store)."""
    return bool(uri) and uri.startswith(("http://", "https://"))


#: Folder beside a local sqlite database that holds its experiments' artifacts (one sub-folder per experiment).
ARTIFACT_DIR = "mlartifacts"


def default_artifact_location(uri: str | None, experiment_name: str) -> str | None:
    """Where a new experiment of a local sqlite store keeps its artifacts.

    ``sqlite:///DIR/mlflow.db`` -> ``DIR/mlartifacts/<experiment name>`` (absolute; a relative database path
    is taken from the working directory, as MLflow does). Any other URI -> ``None``: a server (or a
    ``file:`` store) chooses its own artifact root. MLflow records the location when it creates the
    experiment, so an experiment created before (or by other tools) keeps its own.
    """
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name or "Default").strip(".") or "experiment"
    return os.path.join(os.path.dirname(os.path.abspath(path)), ARTIFACT_DIR, folder)


def server_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` does not answer ``GET {uri}/health``; ``None`` when it does (or when
    ``uri`` is not an HTTP(S) server)."""
    import urllib.error
    import urllib.request

    if not is_remote(uri):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before training when a tracking server does not answer ``GET {uri}/health``.

    Raises:
        ValueError: Naming the URI, the error and the flags that change or disable the logger.
    """
    problem = server_problem(uri, timeout_s)
    if problem is None:
        return
    raise ValueError(
        f"MLflow tracking server {uri} is not reachable ({problem}); nothing was trained. Start the server, or "
        f"pass --trainer.logger.init_args.tracking_uri sqlite:///mlflow.db (local store) or --trainer.logger false")


def relog_command(csv_path: str, tracking_uri: str | None, run_id: str | None) -> str:
    """The shell command that re-logs a local metrics CSV (see :func:`relog_metrics`)."""
    run = f" --run_id {run_id}" if run_id else ""
    return f"python -m rerule_lightning.tracking.logger relog {csv_path} --tracking_uri {tracking_uri}{run}"


def relog_metrics(csv_path: str, tracking_uri: str, run_id: str | None = None, status: str | None = None,
                  chunk: int = 900) -> tuple[str, int]:
    """Log the metrics of a local CSV (written by :class:`ResilientMLFlowLogger`) to an MLflow server.

    Uses only ``mlflow`` and the CSV (columns ``run_id, step, key, value, timestamp_ms``); logging the same
    rows twice stores them once (same key, step, value and timestamp).

    Args:
        csv_path: The ``metrics.csv`` beside the checkpoints.
        tracking_uri: The server to log to.
        run_id: Target run; defaults to the run id in the CSV (the run the outage cut off).
        status: If set (``FINISHED``, ``FAILED``, ``KILLED``), the run is then terminated with it; by default
            the status recorded in ``run.json`` next to the CSV, if any.

    Returns:
        ``(run_id, number of metric values logged)``.
    """
    import csv

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    run_id = run_id or (rows[0]["run_id"] if rows else None)
    if not run_id:
        raise ValueError(f"{csv_path}: no run id in the file; pass run_id")
    rows = [r for r in rows if r["run_id"] == run_id] or rows
    client = MlflowClient(tracking_uri=tracking_uri)
    metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp_ms"]), int(r["step"])) for r in rows]
    for i in range(0, len(metrics), chunk):
        client.log_batch(run_id, metrics=metrics[i:i + chunk])
    sidecar = os.path.join(os.path.dirname(csv_path), "run.json")
    if status is None and os.path.exists(sidecar):
        status = json.load(open(sidecar, encoding="utf-8")).get("status")
    if status:
        client.set_terminated(run_id, status)
    return run_id, len(metrics)


class ResilientMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that keeps every metric in a local CSV and survives the server going away.

    Every ``log_metrics`` call first appends its values to ``metrics.csv`` (columns
    ``run_id, step, key, value, timestamp_ms``) beside the checkpoints: in the ``ModelCheckpoint``
    ``dirpath`` if one is set, else in ``default_root_dir/<experiment id>/<run id>/`` (the parent of
    Lightning's default ``checkpoints/`` folder). When a call to the server fails, the logger warns once,
    stops contacting the server for the rest of the run (training goes on) and prints the command that
    re-logs the CSV (:func:`relog_metrics`). ``finalize`` records the status in ``run.json`` next to the CSV
    (when that directory can be written) and marks the MLflow run ``FINISHED``, ``FAILED`` or ``KILLED`` when
    the server answers, also when the CSV or ``run.json`` cannot be written.

    With a local ``sqlite:///`` store and no ``artifact_location``, an experiment this logger creates keeps
    its artifacts (``config.yaml``, ...) in :func:`default_artifact_location` (``mlartifacts/`` beside the
    database), never in ``./mlruns`` of the working directory.

    Args:
        local_dir: Directory of ``metrics.csv``; by default chosen as above when the CLI binds the trainer.
        **kwargs: Passed to ``MLFlowLogger``.
    """

    def __init__(self, *args: Any, local_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._artifact_location is None:
            self._artifact_location = default_artifact_location(self._tracking_uri, self._experiment_name)
        if is_remote(self._tracking_uri):
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
        self.local_dir = local_dir
        self._root_dir: str | None = None
        self.offline_reason: str | None = None

    def bind(self, trainer: L.Trainer) -> None:
        """Place the CSV beside the trainer's checkpoints (called by the CLI before the run starts)."""
        cb = trainer.checkpoint_callback
        if self.local_dir is None and cb is not None and getattr(cb, "dirpath", None):
            self.local_dir = os.fspath(cb.dirpath)
        self._root_dir = trainer.default_root_dir

    @property
    def csv_path(self) -> str:
        """Where this run's metrics are kept locally."""
        if self.local_dir is None:
            run = self._run_id or "offline"
            exp = self._experiment_id or self._experiment_name
            self.local_dir = os.path.join(self._root_dir or os.getcwd(), str(exp), str(run))
        return os.path.join(self.local_dir, "metrics.csv")

    def _go_offline(self, what: str, err: BaseException) -> None:
        if self.offline_reason is None:
            self.offline_reason = f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning(
                "MLflow tracking server %s failed (%s). Training continues; metrics are kept in %s. "
                "When the server is back, re-log them with:\n  %s", self._tracking_uri, self.offline_reason,
                self.csv_path, relog_command(self.csv_path, self._tracking_uri, self._run_id))

    def _write_csv(self, metrics: list[Any]) -> None:
        import csv

        path = self.csv_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new = not os.path.exists(path)
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_FIELDS)
            for m in metrics:
                w.writerow([self._run_id or "", m.step, m.key, repr(float(m.value)), m.timestamp])

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [(re.sub(r"[^a-zA-Z0-9_/. -]+", "", k), v) for k, v in metrics.items() if not isinstance(v, str)]
        batch = [Metric(key=k, value=float(v), timestamp=ts, step=step or 0) for k, v in items]
        if self.offline_reason is None:
            try:
                _ = self.run_id  # creates the run if needed, so the CSV can name it
            except Exception as err:  # noqa: BLE001 - any client / network error
                self._go_offline("creating the run", err)
        self._write_csv(batch)
        if self.offline_reason is not None:
            return
        try:
            self.experiment.log_batch(run_id=self.run_id, metrics=batch, **self._log_batch_kwargs)
        except Exception as err:  # noqa: BLE001
            self._go_offline(f"logging metrics at step {step}", err)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self.offline_reason is not None:
            return
        try:
            super().log_hyperparams(params)
        except Exception as err:  # noqa: BLE001
            self._go_offline("logging params", err)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        final = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status.upper())
        if self._initialized:  # a run that never reached the server has nothing to re-log
            try:
                os.makedirs(os.path.dirname(self.csv_path), exist_ok=True)
                with open(os.path.join(os.path.dirname(self.csv_path), "run.json"), "w", encoding="utf-8") as f:
                    json.dump({"run_id": self._run_id, "experiment_id": self._experiment_id,
                               "tracking_uri": self._tracking_uri, "status": final,
                               "mlflow_outage": self.offline_reason}, f, indent=2)
            except OSError as err:  # e.g. default_root_dir is a file: the run must still get its status
                log.warning("Could not write run.json beside %s (%s)", self.csv_path, err)
        if self.offline_reason is None:
            try:
                super().finalize(final)  # FINISHED / FAILED / KILLED
                return
            except Exception as err:  # noqa: BLE001
                self._go_offline(f"marking the run {final}", err)
        log.warning("The MLflow run %s could not be marked %s (%s). Metrics are complete in %s; re-log them "
                    "and set the status with:\n  %s", self._run_id, final, self.offline_reason, self.csv_path,
                    relog_command(self.csv_path, self._tracking_uri, self._run_id))


def _relog_main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rerule_lightning.tracking.logger")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("relog", help="log a local metrics.csv (written during an MLflow outage) to a server")
    p.add_argument("csv_path")
    p.add_argument("--tracking_uri", required=True)
    p.add_argument("--run_id", default=None)
    p.add_argument("--status", default=None, help="FINISHED / FAILED / KILLED (default: from run.json)")
    args = parser.parse_args(argv)
    run_id, n = relog_metrics(args.csv_path, args.tracking_uri, args.run_id, args.status)
    print(f"logged {n} metric values to run {run_id} at {args.tracking_uri}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_relog_main())
