"""``rerule report``: compare MLflow runs in a table (Markdown + CSV) and plots, logged to a report run.

Units, groups and statistics:

* A **unit** is one trained model: the MLflow runs that share the tag ``rerule.unit`` (``--merge_by``), e.g.
  the ``fit`` run of a RULE model and the ``test`` run that evaluated it; a run without that tag is a unit by
  itself. A unit's **final** value of a metric is the last logged value (highest step, then latest timestamp)
  in the unit's run that ended last among those that logged it, so an evaluation run overrides the
  validation values logged during fit. Its **curve** of a metric comes from the unit's run that logged it at
  the most steps (the training run). Its **wall-clock** is end − start of its run tagged ``rerule.stage=fit``,
  else the sum over its runs.
* A **group** is the units with equal values of the ``--group_by`` keys (tags first, then params; missing
  values read ``-``), typically seeds of one variant. A row shows mean ± std over its units, with the
  *sample* standard deviation (ddof = 1, as ``statistics.stdev``); with one unit the std is empty.
* **Pareto front** (forget-vs-retain scatter): both axes are maximised; x is ``--pareto_x`` (default
  ``forget/refusal_rate``; prefix ``1-`` for one minus a metric, e.g. ``1-forget/answer_accuracy``), y is
  ``--pareto_y`` (default ``retain/answer_accuracy``). A row is on the front if no other row is ≥ on both
  axes and > on one; the front is computed over the rows of the table (group means when grouped).

Tags that :mod:`rerule_lightning.cli.pipeline` sets on the runs of ``rerule demo`` and the replay benchmark:
``rerule.unit``, ``rerule.variant``, ``rerule.seed``, ``rerule.preset`` (variants only) and ``rerule.stage``.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

from rerule_lightning.tracking.report_rows import (  # noqa: F401  (re-exported)
    UNIT_TAG,
    Row,
    RunInfo,
    Unit,
    axis_value,
    build_rows,
    build_units,
    mean_std,
    merge_unit,
    pareto_front,
)

DEFAULT_METRICS = ["forget/refusal_rate", "forget/answer_accuracy", "boundary_hard/answer_accuracy",
                   "boundary_easy/answer_accuracy", "retain/answer_accuracy", "forget/forget_quality",
                   "utility/model_utility"]
CURVE_METRICS = ["train/reward", "train/reward_forget", "train/reward_boundary", "forget/refusal_rate",
                 "boundary_hard/answer_accuracy", "boundary_easy/answer_accuracy", "replay/buffer_size",
                 "replay/is_weight_mean", "replay/is_weight_max", "replay/ess"]


def _num(x: float) -> str:
    return f"{x:.1e}" if 0 < abs(x) < 5e-4 else f"{x:.3f}"  # forget quality (a p-value) can be ~1e-16


def _fmt(m: float, s: float | None) -> str:
    if not math.isfinite(m):
        return "–"
    return _num(m) if s is None else f"{_num(m)} ± {_num(s)}"


def render_table(rows: list[Row], metrics: list[str], on_front: list[bool]) -> tuple[str, list[list[Any]]]:
    """The Markdown table and the CSV rows (header first) of the report."""
    head = ["run / group", "n", *metrics, "wall-clock (s)", "pareto"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv_rows: list[list[Any]] = [["label", "n", *[f"{m}_{s}" for m in [*metrics, "wall_clock_s"]
                                                   for s in ("mean", "std")], "pareto"]]
    for row, front in zip(rows, on_front):
        cells = [_fmt(*row.stats[m]) for m in metrics]
        wm, ws = row.stats["wall_clock_s"]
        wall = "–" if not math.isfinite(wm) else (f"{wm:.1f}" if ws is None else f"{wm:.1f} ± {ws:.1f}")
        md.append("| " + " | ".join([row.label, str(len(row.units)), *cells, wall, "✓" if front else ""]) + " |")
        vals: list[Any] = []
        for m in [*metrics, "wall_clock_s"]:
            mean, std = row.stats[m]
            vals += ["" if not math.isfinite(mean) else mean, "" if std is None else std]
        csv_rows.append([row.label, len(row.units), *vals, int(front)])
    return "\n".join(md) + "\n", csv_rows


# ------------------------------------------------------------------------------------------- MLflow glue
def _as_list(x: str | list[str] | None) -> list[str]:
    if x is None:
        return []
    items = [x] if isinstance(x, str) else list(x)
    return [p.strip() for i in items for p in str(i).split(",") if p.strip()]


def open_store(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for an existing, reachable store, else ``ValueError`` (nothing is created)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]
        if not os.path.isfile(path):
            raise ValueError(f"--tracking_uri={tracking_uri}: no such MLflow database file {path!r}")
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        path = tracking_uri[len("file://"):] if tracking_uri.startswith("file://") else tracking_uri
        if not os.path.isdir(path):
            raise ValueError(f"--tracking_uri={tracking_uri}: no such MLflow directory {path!r}")
    elif tracking_uri.startswith(("http://", "https://")):  # fail fast: MLflow's client retries for minutes
        from rerule_lightning.tracking.logger import server_problem

        problem = server_problem(tracking_uri, timeout_s=3.0)
        if problem is not None:
            raise ValueError(f"--tracking_uri={tracking_uri}: cannot reach the tracking server ({problem})")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # unreachable server, corrupt database, ...
        raise ValueError(f"--tracking_uri={tracking_uri}: cannot read the tracking store: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return client


def fetch_runs(client: Any, experiments: list[str], run_ids: list[str], filter_string: str | None,
               curve_metrics: list[str]) -> list[RunInfo]:
    """The selected runs with their final metrics and the histories of ``curve_metrics``."""
    from mlflow.exceptions import MlflowException

    exp_ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"--experiment={name!r}: no such experiment; known: {known}")
        exp_ids.append(exp.experiment_id)
    try:
        if run_ids:
            raw = []
            for rid in run_ids:
                try:
                    raw.append(client.get_run(rid))
                except MlflowException:
                    raise ValueError(f"--run_ids: no run {rid!r} in the tracking store") from None
            if exp_ids:
                raw = [r for r in raw if r.info.experiment_id in exp_ids]
        else:
            if not exp_ids:
                raise ValueError("give --experiment and/or --run_ids")
            raw = client.search_runs(exp_ids, filter_string=filter_string or "", max_results=50_000)
    except MlflowException as e:
        raise ValueError(f"--filter={filter_string!r}: {str(e).splitlines()[0]}") from None
    if run_ids and filter_string:
        ids = {r.info.run_id for r in client.search_runs(exp_ids or list({r.info.experiment_id for r in raw}),
                                                         filter_string=filter_string, max_results=50_000)}
        raw = [r for r in raw if r.info.run_id in ids]
    raw = [r for r in raw if r.data.tags.get("rerule.report") is None]  # never report on reports
    if not raw:
        raise ValueError(f"no runs match (experiment={experiments}, run_ids={run_ids}, filter={filter_string!r})")
    out = []
    for r in raw:
        hist = {}
        for k in curve_metrics:
            if k in r.data.metrics:
                hist[k] = [(int(m.step), float(m.value)) for m in client.get_metric_history(r.info.run_id, k)]
        out.append(RunInfo(r.info.run_id, r.info.run_name or r.info.run_id[:8], dict(r.data.tags),
                           dict(r.data.params), int(r.info.start_time or 0), r.info.end_time,
                           {k: float(v) for k, v in r.data.metrics.items()}, hist))
    return out


def tag_unit(tracking_uri: str, run_ids: dict[str, str], variant: str, seed: int, preset: str | None = None) -> None:
    """Tag one model's runs (``{stage: run_id}``, e.g. ``fit`` and ``eval``) for grouping by ``rerule report``.

    Sets ``rerule.variant``, ``rerule.seed``, ``rerule.preset`` (when given), ``rerule.stage`` (the dict key)
    and ``rerule.unit`` (``[preset/]seed<seed>/<variant>``); run ids ``-`` or empty are skipped.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    unit = "/".join([*([preset] if preset else []), f"seed{seed}", variant])
    tags = {"variant": variant, "seed": str(seed), **({"preset": preset} if preset else {}), "unit": unit}
    for stage, rid in run_ids.items():
        if not rid or rid == "-":
            continue
        for k, v in {**tags, "stage": stage}.items():
            client.set_tag(rid, f"rerule.{k}", v)


def write_report(rows: list[Row], units: list[Unit], metrics: list[str], output_dir: str, pareto_x: str,
                 pareto_y: str, title: str) -> list[str]:
    """Write report.md, report.csv and the PNGs; return the written paths."""
    from rerule_lightning.tracking import plots

    os.makedirs(output_dir, exist_ok=True)
    on_front = pareto_front([(axis_value(r.stats, pareto_x), axis_value(r.stats, pareto_y)) for r in rows])
    md, csv_rows = render_table(rows, metrics, on_front)
    pngs = plots.write_all(rows, on_front, output_dir, pareto_x, pareto_y)
    with open(os.path.join(output_dir, "report.csv"), "w", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    notes = (f"\nMean ± sample std (ddof = 1) over the units of each row; final value = last logged value; "
             f"wall-clock = end − start of the unit's fit run. Pareto front (✓): maximise x = `{pareto_x}` and "
             f"y = `{pareto_y}` over the rows.\n\n")
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(f"# {title}\n\n{len(units)} units in {len(rows)} rows.\n\n{md}{notes}")
        f.write("\n".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})" for p in pngs))
        f.write("\n")
    return [os.path.join(output_dir, "report.md"), os.path.join(output_dir, "report.csv"), *pngs]


def check_metrics(runs: list[Any], chosen: dict[str, list[str]]) -> None:
    """Every metric a flag names is logged by at least one selected run (else an empty plot or column).

    Raises:
        ValueError: Naming the flag, the metric and the metrics the runs have.
    """
    known = sorted({k for r in runs for k in r.final})
    for flag, names in chosen.items():
        missing = [m for m in names if m not in known]
        if missing:
            shown = ", ".join(known[:40]) + (f" ... ({len(known)} in all)" if len(known) > 40 else "")
            raise ValueError(f"{flag}={','.join(missing)}: no selected run logged this metric; choose from: {shown}")


def report(tracking_uri: str = "sqlite:///mlflow.db", experiment: str | list[str] | None = None,
           run_ids: str | list[str] | None = None, filter: str | None = None,  # noqa: A002
           group_by: str | list[str] | None = None, metrics: str | list[str] | None = None,
           merge_by: str = UNIT_TAG, pareto_x: str = "forget/refusal_rate",
           pareto_y: str = "retain/answer_accuracy", output_dir: str = "runs/report",
           report_experiment: str | None = None, log_run: bool = True) -> dict[str, Any]:
    """Compare MLflow runs: table (report.md / report.csv), curves and a Pareto scatter, logged to a run.

    Args:
        tracking_uri: MLflow tracking URI of an existing store (``sqlite:///mlflow.db``, a directory, a server).
        experiment: Experiment name(s) to read (comma-separated or a list).
        run_ids: Only these runs (comma-separated or a list); combined with ``experiment`` / ``filter``.
        filter: MLflow search filter, e.g. ``"tags.`rerule.preset` = 'hard'"``.
        group_by: Tag or param key(s) whose equal values form one row (mean ± sample std over its units).
        metrics: Final metrics shown as columns (default: forget refusal / accuracy, boundary and retain
            accuracy, forget quality, model utility).
        merge_by: Tag whose equal values merge runs into one unit (a model's fit and eval runs).
        pareto_x: Forget axis of the scatter (maximised; ``1-`` prefix for one minus a metric).
        pareto_y: Retain axis of the scatter (maximised).
        output_dir: Where report.md, report.csv and the PNGs are written.
        report_experiment: Experiment of the report run (default ``<first experiment>-report``).
        log_run: Log the files as artifacts of a new report run.

    Returns:
        ``{"output_dir", "files", "run_id"}``.
    """
    experiments, ids, groups = _as_list(experiment), _as_list(run_ids), _as_list(group_by)
    cols = _as_list(metrics) or list(DEFAULT_METRICS)
    for spec in (pareto_x, pareto_y):
        if not spec.removeprefix("1-"):
            raise ValueError(f"empty Pareto axis {spec!r}")
    client = open_store(tracking_uri)
    axes = [s.removeprefix("1-") for s in (pareto_x, pareto_y)]
    runs = fetch_runs(client, experiments, ids, filter, list(dict.fromkeys([*CURVE_METRICS, *axes])))
    check_metrics(runs, {"--pareto_x": [axes[0]], "--pareto_y": [axes[1]], "--metrics": _as_list(metrics)})
    units = build_units(runs, merge_by)
    rows = build_rows(units, list(dict.fromkeys([*cols, *axes])), groups or None)
    title = f"rerule report: {', '.join(experiments) or 'selected runs'}"
    files = write_report(rows, units, cols, output_dir, pareto_x, pareto_y, title)
    run_id = None
    if log_run:
        exp_name = report_experiment or f"{experiments[0] if experiments else 'rerule'}-report"
        exp = client.get_experiment_by_name(exp_name)
        if exp is None:
            from rerule_lightning.tracking.logger import default_artifact_location

            exp_id = client.create_experiment(exp_name,
                                              artifact_location=default_artifact_location(tracking_uri, exp_name))
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, tags={"rerule.report": "1", "rerule.report.experiments": ",".join(experiments),
                                              "rerule.report.group_by": ",".join(groups)},
                                run_name="report")
        run_id = run.info.run_id
        client.log_param(run_id, "num_runs", len(runs))
        client.log_param(run_id, "num_units", len(units))
        for path in files:
            client.log_artifact(run_id, path)
        client.set_terminated(run_id)
    print(f"report: {len(runs)} runs, {len(units)} units, {len(rows)} rows -> {os.path.abspath(output_dir)}")
    for path in files:
        print(f"  {path}")
    if run_id:
        print(f"logged as artifacts of MLflow run {run_id} (experiment {exp_name!r}, {tracking_uri})")
    return {"output_dir": output_dir, "files": files, "run_id": run_id}


def report_main(argv: list[str]) -> int:
    """``rerule report``: jsonargparse over :func:`report`."""
    from jsonargparse import CLI

    from rerule_lightning.cli.validation import check_config_files

    check_config_files(argv)  # exists, UTF-8, no key twice
    CLI(report, args=argv, as_positional=False)
    return 0
