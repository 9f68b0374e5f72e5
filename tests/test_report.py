"""``rerule report`` on a hand-built MLflow store: table numbers, plots, the report run, error cases."""

from __future__ import annotations

import csv
import math
import os

import pytest

from rerule_lightning.cli.commands import main
from rerule_lightning.cli.report import RunInfo, mean_std, merge_unit, pareto_front

PNGS = ["reward_vs_step.png", "forget_refusal_vs_step.png", "boundary_accuracy_vs_step.png",
        "replay_buffer_vs_step.png", "is_weights_vs_step.png", "forget_vs_retain_pareto.png"]

# (variant, seed): fit seconds, final forget refusal, retain accuracy, boundary_hard accuracy (eval)
UNITS = {
    ("A", 0): (10.0, 0.9, 0.9, 0.80),
    ("A", 1): (20.0, 0.8, 0.7, 0.60),
    ("B", 0): (30.0, 0.6, 1.0, 0.50),
    ("B", 1): (40.0, 1.0, 0.9, 0.70),
    ("C", 0): (50.0, 0.7, 0.75, 0.40),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Five units (variants A, B with seeds 0 and 1, C with seed 0), each a fit run and an eval run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("exp")
    t0 = 1_700_000_000_000
    for i, ((variant, seed), (secs, refusal, retain, bhard)) in enumerate(UNITS.items()):
        tags = {"rerule.variant": variant, "rerule.seed": str(seed), "rerule.unit": f"{variant}/{seed}"}
        start = t0 + i * 100_000
        fit = client.create_run(exp, start_time=start, tags={**tags, "rerule.stage": "fit"}).info.run_id
        for step in range(3):
            client.log_metric(fit, "train/reward", 0.1 * step + 0.01 * i, step=step, timestamp=start + step)
            if variant == "A":
                client.log_metric(fit, "replay/buffer_size", 2.0 * step, step=step, timestamp=start + step)
                client.log_metric(fit, "replay/is_weight_mean", 1.0, step=step, timestamp=start + step)
                client.log_metric(fit, "replay/is_weight_max", 1.5, step=step, timestamp=start + step)
        # validation during fit: overridden by the (later) eval run's value
        client.log_metric(fit, "boundary_hard/answer_accuracy", 0.11, step=1, timestamp=start + 1)
        client.log_metric(fit, "boundary_hard/answer_accuracy", 0.22, step=2, timestamp=start + 2)
        client.set_terminated(fit, end_time=start + int(secs * 1000))
        ev_start = start + int(secs * 1000) + 1
        ev = client.create_run(exp, start_time=ev_start, tags={**tags, "rerule.stage": "eval"}).info.run_id
        client.log_metric(ev, "forget/refusal_rate", 0.0, step=0, timestamp=ev_start)  # superseded: step 1 is last
        client.log_metric(ev, "forget/refusal_rate", refusal, step=1, timestamp=ev_start + 1)
        client.log_metric(ev, "retain/answer_accuracy", retain, step=1, timestamp=ev_start + 1)
        client.log_metric(ev, "boundary_hard/answer_accuracy", bhard, step=1, timestamp=ev_start + 1)
        client.set_terminated(ev, end_time=ev_start + 5000)
    return uri


def _csv(path: str) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r["label"]: r for r in csv.DictReader(f)}


def test_mean_std_is_sample_std() -> None:
    assert mean_std([0.9, 0.8]) == pytest.approx((0.85, math.sqrt(0.005)))  # ((0.05² + 0.05²) / (2 − 1))^½
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt(7.0)))  # (4 + 1 + 9) / 2 = 7
    assert mean_std([4.0]) == (4.0, None)
    m, s = mean_std([float("nan")])
    assert math.isnan(m) and s is None


def test_pareto_front_maximises_both_axes() -> None:
    nan = float("nan")
    pts = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.4, 0.4), (nan, 2.0), (0.5, 0.5)]
    assert pareto_front(pts) == [True, True, True, False, False, True]  # equal points do not dominate


def test_merge_unit_eval_overrides_fit_and_wall_clock_from_fit() -> None:
    fit = RunInfo("f", "f", {"rerule.stage": "fit"}, {}, 0, 10_000, {"m": 0.2}, {"c": [(2, 1.0), (1, 0.0)]})
    ev = RunInfo("e", "e", {"rerule.stage": "eval"}, {}, 10_001, 15_000, {"m": 0.9}, {"c": [(0, 5.0)]})
    u = merge_unit("u", [ev, fit])
    assert u.final == {"m": 0.9} and u.wall_clock_s == 10.0 and u.curves["c"] == [(1, 0.0), (2, 1.0)]


def test_report_table_plots_and_run(store: str, tmp_path, capsys, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from PIL import Image

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the report run's artifacts must not land in ./mlruns of the working directory
    out = tmp_path / "rep"
    rc = main(["report", "--tracking_uri", store, "--experiment", "exp", "--group_by", "rerule.variant",
               "--metrics", "forget/refusal_rate,retain/answer_accuracy,boundary_hard/answer_accuracy",
               "--output_dir", str(out)])
    assert rc == 0
    rows = _csv(str(out / "report.csv"))
    assert list(rows) == ["A", "B", "C"]
    a, b, c = rows["A"], rows["B"], rows["C"]
    assert a["n"] == "2" and c["n"] == "1"
    # A: refusal (0.9, 0.8), retain (0.9, 0.7), boundary (0.8, 0.6) from the eval runs, fit 10 s and 20 s
    assert float(a["forget/refusal_rate_mean"]) == pytest.approx(0.85)
    assert float(a["forget/refusal_rate_std"]) == pytest.approx(0.0707107, abs=1e-6)
    assert float(a["retain/answer_accuracy_mean"]) == pytest.approx(0.8)
    assert float(a["retain/answer_accuracy_std"]) == pytest.approx(0.1414214, abs=1e-6)
    assert float(a["boundary_hard/answer_accuracy_mean"]) == pytest.approx(0.7)
    assert float(a["wall_clock_s_mean"]) == pytest.approx(15.0)
    assert float(a["wall_clock_s_std"]) == pytest.approx(7.0710678, abs=1e-6)
    # B: refusal (0.6, 1.0) -> 0.8 ± 0.2828; retain (1.0, 0.9) -> 0.95; fit 30 s and 40 s
    assert float(b["forget/refusal_rate_mean"]) == pytest.approx(0.8)
    assert float(b["forget/refusal_rate_std"]) == pytest.approx(0.2828427, abs=1e-6)
    assert float(b["retain/answer_accuracy_mean"]) == pytest.approx(0.95)
    assert float(b["wall_clock_s_mean"]) == pytest.approx(35.0)
    # C: one seed, empty std
    assert float(c["forget/refusal_rate_mean"]) == pytest.approx(0.7) and c["forget/refusal_rate_std"] == ""
    # Pareto (refusal, retain): A (0.85, 0.80), B (0.80, 0.95) on the front; C (0.70, 0.75) dominated
    assert (a["pareto"], b["pareto"], c["pareto"]) == ("1", "1", "0")
    md = (out / "report.md").read_text()
    assert "| A | 2 | 0.850 ± 0.071 | 0.800 ± 0.141 | 0.700 ± 0.141 | 15.0 ± 7.1 | ✓ |" in md
    assert "| C | 1 | 0.700 | 0.750 | 0.400 | 50.0 |  |" in md
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 300
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("exp-report")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`rerule.report` = '1'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    arts = {f.path for f in client.list_artifacts(runs[0].info.run_id)}
    assert arts == {"report.md", "report.csv", *PNGS}
    assert runs[0].info.run_id in capsys.readouterr().out
    db_dir = os.path.dirname(store[len("sqlite:///"):])
    assert exp.artifact_location.startswith(os.path.join(db_dir, "mlartifacts"))
    assert not list(cwd.iterdir())  # no mlruns/ here


def test_report_units_filter_and_no_run(store: str, tmp_path) -> None:
    out = tmp_path / "units"
    assert main(["report", "--tracking_uri", store, "--experiment", "exp", "--output_dir", str(out),
                 "--filter", "tags.`rerule.variant` = 'A'", "--log_run", "false"]) == 0
    rows = _csv(str(out / "report.csv"))
    assert list(rows) == ["A/0", "A/1"]  # one row per unit: fit + eval runs merged
    assert float(rows["A/1"]["forget/refusal_rate_mean"]) == pytest.approx(0.8)
    assert float(rows["A/1"]["wall_clock_s_mean"]) == pytest.approx(20.0)


@pytest.mark.parametrize("args, message", [
    (["--tracking_uri", "sqlite:///{tmp}/missing.db", "--experiment", "exp"], "no such MLflow database"),
    (["--tracking_uri", "http://127.0.0.1:9", "--experiment", "exp"], "cannot reach the tracking server"),
    (["--experiment", "nope"], "no such experiment"),
    (["--experiment", "exp", "--filter", "tags.`rerule.variant` = 'Z'"], "no runs match"),
    (["--experiment", "exp", "--filter", "this is not a filter"], "--filter"),
    (["--run_ids", "0123456789abcdef0123456789abcdef"], "no run"),
    (["--experiment", "exp", "--pareto_x", "unknown_metric"],
     "--pareto_x=unknown_metric: no selected run logged this metric; choose from: boundary_hard/answer_accuracy, "
     "forget/refusal_rate, "),
    (["--experiment", "exp", "--pareto_y", "1-nope"], "--pareto_y=nope: no selected run logged this metric"),
    (["--experiment", "exp", "--metrics", "[forget/refusal_rate,typo/rate]"], "--metrics=typo/rate: no selected"),
])
def test_report_errors_before_writing(store: str, tmp_path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "never"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--tracking_uri" not in argv:
        argv = ["--tracking_uri", store, *argv]
    assert main(["report", *argv, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rerule: error:") and message in err
    assert not out.exists()
    assert not os.path.exists(tmp_path / "missing.db")


def test_tag_unit_tags_every_stage(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from rerule_lightning.cli.report import tag_unit

    uri = f"sqlite:///{tmp_path / 'tags.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e")
    fit, ev = (client.create_run(exp).info.run_id for _ in range(2))
    tag_unit(uri, {"fit": fit, "eval": ev, "other": "-"}, "ReRULE (hard-case)", 2, "hard")
    tags = {k: v for k, v in client.get_run(fit).data.tags.items() if k.startswith("rerule.")}
    assert tags == {"rerule.variant": "ReRULE (hard-case)", "rerule.seed": "2", "rerule.preset": "hard",
                    "rerule.unit": "hard/seed2/ReRULE (hard-case)", "rerule.stage": "fit"}
    assert client.get_run(ev).data.tags["rerule.stage"] == "eval"
    tag_unit(uri, {"fit": fit}, "rejection steering", 0)
    assert client.get_run(fit).data.tags["rerule.unit"] == "seed0/rejection steering"
