"""benchmarks/frontier.py end to end on the tiny world, through the code path of the real run (``main``): a sweep
file, RS, RULE / ReRULE / a baseline trajectory, points on the selection half, the chosen points re-run (checked
equal) and evaluated on the report half, tables and plots; a run killed midway resumes without redoing work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import frontier as FB  # noqa: E402
from benchmarks import frontier_analysis as FA  # noqa: E402
from benchmarks import replay as RP  # noqa: E402
from rerule_lightning.tracking.frontier import REFUSAL, Constraint  # noqa: E402

SWEEP = """
seeds: [0]
preset: hard
val_items: 4
rl:
  config: configs/embedded/rule.yaml
  learning_rate: 1.0e-4
  lr_multipliers: [1, 4]
  steps: 4
  long_steps: null
  val_every: 2
  extra: [--data.init_args.batch_size, "4", --model.init_args.num_generations, "2", --model.init_args.max_new_tokens, "8"]
  methods:
    RULE: []
    ReRULE (fill, group adv.): [--config, configs/replay/hard_case_fill.yaml]
baselines:
  max_epochs: 2
  methods:
    GradDiff:
      config: configs/baselines/graddiff.yaml
      grid: {learning_rate: [3.0e-4]}
"""
#: The tiny world's models reach none of the real constraints in 4 steps; a constraint every point meets (the
#: best same-family point of each method is chosen) exercises the same selection, re-run and report path.
ANY = Constraint("any point", REFUSAL, ">=", 0.0, retain_floor=0.0)


@pytest.fixture(scope="module")
def killed_then_resumed(tiny_prepared: dict, one_torch_thread: None, tmp_path_factory: pytest.TempPathFactory
                        ) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("frontier")
    sweep = tmp / "sweep.yaml"
    sweep.write_text(SWEEP)
    cache = str(Path(tiny_prepared["links"]["world"]).parent.parent)
    argv = ["--sweep", str(sweep), "--output_dir", str(tmp / "out"), "--cache_dir", cache, "--no_prepare",
            "--threads", "1", "--tracking_uri", f"sqlite:///{tmp / 'mlflow.db'}", "--keep_models"]
    mp = pytest.MonkeyPatch()
    mp.setattr(FA, "CONSTRAINTS", (ANY,))
    real = FB._lightning
    calls: list[list[str]] = []

    def killed_on_second_sweep_fit(a: list[str]) -> Any:  # RULE lr 1e-4 finishes, the "kill" inside RULE lr 4e-4
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(a)

    mp.setattr(FB, "_lightning", killed_on_second_sweep_fit)
    with pytest.raises(KeyboardInterrupt):
        FB.main(argv)
    first = json.loads((tmp / "out" / "results.json").read_text())["runs"]
    resumed: list[list[str]] = []

    def counted(a: list[str]) -> Any:
        resumed.append(a)
        return real(a)

    mp.setattr(FB, "_lightning", counted)
    mp.setattr(RP, "_lightning", counted)  # RS and every `rerule test` of the benchmark
    assert FB.main(argv) == 0
    mp.undo()
    return {"out": tmp / "out", "uri": argv[argv.index("--tracking_uri") + 1], "first": first, "calls": calls, "resumed": resumed,
            "sweep": str(sweep), "cache": cache, "tmp": tmp,
            "results": json.loads((tmp / "out" / "results.json").read_text())["runs"]}


@pytest.mark.slow
def test_resume_after_kill_redoes_nothing_finished(killed_then_resumed: dict) -> None:
    first, results = killed_then_resumed["first"], killed_then_resumed["results"]
    assert [r.get("stage") or r["key"] for r in first] == ["rejection steering", "RULE|learning_rate=0.0001|4"]
    assert results[:2] == first  # the finished records are kept as they were
    fits = [a for a in killed_then_resumed["resumed"] if a[0] == "fit"]
    keys = [r["key"] for r in results if r.get("kind") == "run"]
    # resumed: the four unfinished sweep runs, then one re-run per chosen point; RS and the first run never again
    assert keys == ["RULE|learning_rate=0.0001|4", "RULE|learning_rate=0.0004|4",
                    "ReRULE (fill, group adv.)|learning_rate=0.0001|4", "ReRULE (fill, group adv.)|learning_rate=0.0004|4",
                    "GradDiff|learning_rate=0.0003|2"]
    reports = [r for r in results if r.get("kind") == "report"]
    assert len(fits) == 4 + len(reports) and not any("configs/embedded/rs.yaml" in a for a in fits)
    tests = [a for a in killed_then_resumed["resumed"] if a[0] == "test"]
    assert len(tests) == len(reports) and all(a[a.index("--data.init_args.eval_half") + 1] == "report" for a in tests)


@pytest.mark.slow
def test_points_chosen_points_report_half_and_outputs(killed_then_resumed: dict) -> None:
    out, results = killed_then_resumed["out"], killed_then_resumed["results"]
    runs = {r["key"]: r for r in results if r.get("kind") == "run"}
    rule = runs["RULE|learning_rate=0.0001|4"]
    assert [(p["step"], p["sequences"]) for p in rule["points"]] == [(2, 16.0), (4, 32.0)]  # B·G = 4·2 per step
    base = runs["GradDiff|learning_rate=0.0003|2"]
    assert [p["epoch"] for p in base["points"]] == [1, 2]
    assert base["points"][1]["sequences"] == 2 * base["points"][0]["sequences"] > 0     # forget + retain rows
    for r in runs.values():
        for p in r["points"]:
            for s in ("forget", "boundary_hard", "boundary_easy", "retain"):
                rates = [p["select"][f"{s}/{k}"] for k in ("refusal_rate", "answer_accuracy", "wrong_answer_rate",
                                                            "degenerate_rate")]
                assert sum(rates) == pytest.approx(1.0, abs=1e-6)
    reports = [r for r in results if r.get("kind") == "report"]
    assert {r["method"] for r in reports} == {"RULE", "ReRULE (fill, group adv.)", "GradDiff"}  # one per method
    for rep in reports:
        assert rep["verified"], f"re-run of {rep['key']} to {rep['at']} differs: {rep['rerun_select']}"
        assert rep["rerun_validations"] == "chosen point only"  # validations do not move the training
        assert "holdout/answer_accuracy" in rep["report"] and "forget/degenerate_rate" in rep["report"]
        assert (Path(rep["model_dir"]) / "config.json").is_file()  # --keep_models: the evaluated model is kept
    from benchmarks import robustness

    with pytest.MonkeyPatch.context() as mp:  # robustness attacks exactly those kept models (and each seed's RS)
        mp.setattr(FA, "CONSTRAINTS", (ANY,))
        attacked = robustness.models_from_frontier([str(out)], [0], "any point")
    by_method = {rep["method"]: rep["model_dir"] for rep in reports}
    assert attacked == [("RS", 0, str(out / "seed0" / "rs")), ("RULE", 0, by_method["RULE"]),
                        ("ReRULE", 0, by_method["ReRULE (fill, group adv.)"]), ("GA+GDR", 0, by_method["GradDiff"])]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=killed_then_resumed["uri"])
    exp = client.get_experiment_by_name("rerule-frontier")
    tagged = client.search_runs([exp.experiment_id], "tags.`rerule.stage` = 'report'")
    assert sorted((r.data.tags["rerule.method"], r.data.tags["rerule.knob"], r.data.tags["rerule.value"],
                   r.data.tags["rerule.step"]) for r in tagged) == sorted(
        (rep["method"], "learning_rate", rep["key"].split("=")[1].split("|")[0], str(rep["at"])) for rep in reports)
    table = (out / "table.md").read_text()
    assert "| RULE | any point | 1/1 |" in table and "(reference)" in table and "Δ area vs RULE" in table
    assert "| GradDiff | any point | 1/1 |" in table
    for png in ("frontier_refusal.png", "frontier_accuracy.png"):
        assert (out / png).stat().st_size > 1000
    assert len((out / "points.csv").read_text().splitlines()) == 1 + sum(len(r["points"]) for r in runs.values())
    # --analyse_only rebuilds the same table from results.json
    (out / "table.md").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FA, "CONSTRAINTS", (ANY,))
        assert FB.main(["--analyse_only", "--output_dir", str(out)]) == 0
    assert (out / "table.md").read_text() == table


def test_sweep_file_declares_every_method_and_quick_shrinks_it() -> None:
    full = FB.load_sweep(FB.DEFAULT_SWEEP)
    methods = list(dict.fromkeys(r.method for r in full["runs"]))
    assert methods == ["RULE", "ReRULE (fill, group adv.)", "ReRULE (add, group adv.)", "random replay",
                       "prompt replay", "GA", "GradDiff", "NPO", "SimNPO", "IdkDPO", "RMU"]
    rule = [r for r in full["runs"] if r.method == "RULE"]
    assert [(r.knobs["learning_rate"], r.budget) for r in rule] == [(5e-5, 60), (1e-4, 60), (2e-4, 60), (4e-4, 60),
                                                                    (1e-4, 120)]
    npo = [r for r in full["runs"] if r.method == "NPO"]
    assert len(npo) == 2 * 3 * 2 and all(r.budget == 40 and r.extra[:2] == ["--model.init_args.regularizer", "klr"]
                                         for r in npo)
    assert {r.knobs["beta"] for r in full["runs"] if r.method == "SimNPO"} == {2.5, 4.5}
    assert full["seeds"] == [0, 1, 2, 3, 4] and full["val_items"] == 48
    assert (full["val_every"], full["val_every_epochs"]) == (5, 1)
    quick = FB.load_sweep(FB.DEFAULT_SWEEP, quick=True)
    assert quick["seeds"] == [0, 1]
    assert [(r.method, r.knobs, r.budget) for r in quick["runs"]] == [
        ("RULE", {"learning_rate": 1e-4}, 30), ("RULE", {"learning_rate": 4e-4}, 30),
        ("ReRULE (fill, group adv.)", {"learning_rate": 1e-4}, 30), ("ReRULE (fill, group adv.)", {"learning_rate": 4e-4}, 30),
        ("GradDiff", {"learning_rate": 1e-4, "retain_weight": 1}, 10),
        ("NPO", {"learning_rate": 1e-4, "retain_weight": 1, "beta": 0.1}, 10)]
    budget = FB.load_sweep(FB.DEFAULT_SWEEP, profile="budget")  # the cut sweep that was run (RESULTS §11)
    assert budget["seeds"] == [0, 1, 2, 3, 4] and (budget["val_every"], budget["val_every_epochs"]) == (5, 3)
    assert [(r.knobs["learning_rate"], r.budget) for r in budget["runs"] if r.method == "prompt replay"] == [
        (1e-4, 60), (4e-4, 60)]
    counts = {m: sum(r.method == m for r in budget["runs"]) for m in dict.fromkeys(r.method for r in budget["runs"])}
    assert counts == {"RULE": 2, "ReRULE (fill, group adv.)": 2, "ReRULE (add, group adv.)": 2, "random replay": 2,
                      "prompt replay": 2, "GA": 2, "GradDiff": 3, "NPO": 3, "SimNPO": 3, "IdkDPO": 3, "RMU": 4}
    npo = [r for r in budget["runs"] if r.method == "NPO"]
    assert [r.knobs for r in npo] == [{"learning_rate": 3e-4, "retain_weight": w, "beta": 0.1} for w in (1, 5, 20)]
    assert all(r.budget == 30 and r.extra[:2] == ["--model.init_args.regularizer", "klr"] for r in npo)  # `set` kept
    assert {r.knobs["beta"] for r in budget["runs"] if r.method == "SimNPO"} == {4.5}
    with pytest.raises(SystemExit, match=r"--methods \['Nope'\]: not in"):
        FB.load_sweep(FB.DEFAULT_SWEEP, methods=["Nope"])
    with pytest.raises(SystemExit, match="no such file"):
        FB.load_sweep("missing.yaml")


def test_profile_errors_name_the_file_and_section(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP + "budget:\n  baselines:\n    methods:\n      NPO: {grid: {beta: [0.1]}}\n")
    with pytest.raises(SystemExit, match=r"--profile quick: .*sweep.yaml has no 'quick' section"):
        FB.load_sweep(str(sweep), profile="quick")
    with pytest.raises(SystemExit, match=r"sweep.yaml: budget.baselines.methods: \['NPO'\] are not methods of "
                                         r"baselines \(\['GradDiff'\]\)"):
        FB.load_sweep(str(sweep), profile="budget")


def _results(d: Path, runs: list[dict]) -> str:
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"settings": {"x": str(d)}, "runs": runs}))
    return str(d)


def test_merge_results_of_two_processes_and_refuses_a_unit_twice(tmp_path: Path) -> None:
    rl = [{"stage": "rejection steering", "seed": 0},
          {"kind": "run", "key": "RULE|lr=1|60", "seed": 0, "points": []},
          {"kind": "report", "key": "RULE|lr=1|60", "seed": 0, "at": 5}]
    base = [{"kind": "run", "key": "NPO|lr=3|30", "seed": 0, "points": []},
            {"kind": "run", "key": "NPO|lr=3|30", "seed": 1, "points": []}]
    a, b = _results(tmp_path / "a", rl), _results(tmp_path / "b", base)
    out = FA.merge_results([a, b], str(tmp_path / "ab"))
    merged = json.loads(Path(out).read_text())
    assert merged["runs"] == rl + base
    assert [s["input"] for s in merged["settings"]["merged"]] == [a, b]
    c = _results(tmp_path / "c", base[1:])
    with pytest.raises(SystemExit, match=r"c/results.json: run 'NPO\|lr=3\|30' seed 1 is also in .*b/results.json"):
        FA.merge_results([a, b, c], str(tmp_path / "abc"))
    assert not (tmp_path / "abc").exists()  # nothing half-written
    with pytest.raises(SystemExit, match=r"--inputs .*nowhere': no results.json there"):
        FA.merge_results([a, str(tmp_path / "nowhere")], str(tmp_path / "x"))


@pytest.mark.slow
def test_closest_keeps_the_most_forgetting_point_of_a_method(killed_then_resumed: dict,
                                                             capsys: pytest.CaptureFixture) -> None:
    from benchmarks import frontier_closest as FC
    from rerule_lightning.tracking.frontier import FORGET_ACC, closest

    k = killed_then_resumed
    out = k["tmp"] / "closest"
    argv = ["--from", str(k["out"]), "--methods", "GradDiff", "--seeds", "0", "--retain_floor", "0.0",
            "--sweep", k["sweep"], "--output_dir", str(out), "--cache_dir", k["cache"], "--threads", "1",
            "--tracking_uri", f"sqlite:///{k['tmp'] / 'closest.db'}"]
    assert FC.main(argv) == 0
    expected = closest(FA._points([r for r in k["results"] if r.get("kind") == "run" and r["method"] == "GradDiff"])[("GradDiff", 0)], 0.0)
    [rec] = json.loads((out / "results.json").read_text())["runs"]
    assert (rec["kind"], rec["key"], rec["at"], rec["verified"]) == ("report", expected["key"], expected["at"], True)
    assert rec["rerun_select"][FORGET_ACC] == expected["select"][FORGET_ACC]
    assert (Path(rec["model_dir"]) / "config.json").exists()  # kept for benchmarks/robustness.py --model
    assert capsys.readouterr().out.strip().endswith(f"--model 'GradDiff (closest)' 0 {rec['model_dir']}")
    assert FC.main(argv) == 0  # resumed: nothing re-run, nothing added
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 1


def test_closest_refuses_a_missing_frontier_and_its_own_directory(tmp_path: Path) -> None:
    from benchmarks import frontier_closest as FC

    with pytest.raises(SystemExit, match="--from .*nothing: no results.json"):
        FC.main(["--from", str(tmp_path / "nothing"), "--methods", "GA"])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text('{"runs": []}')
    with pytest.raises(SystemExit, match="--output_dir must differ from --from"):
        FC.main(["--from", str(tmp_path / "f"), "--methods", "GA", "--output_dir", str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="no run of 'GA' on seed 0"):
        FC.main(["--from", str(tmp_path / "f"), "--methods", "GA", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # refused before anything was written
