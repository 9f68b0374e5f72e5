"""Is it forgotten or only refused? ``rerule attack`` over RS, RULE, default ReRULE and the six loss baselines.

    python benchmarks/robustness.py --models_from runs/baselines --seeds 0 1 2 --threads 1 --output_dir runs/robustness
    python benchmarks/robustness.py --train --seeds 0 1 2 --threads 1 --output_dir runs/robustness   # train first
    python benchmarks/robustness.py --model NPO 0 runs/x/npo --model NPO 1 runs/y/npo               # any models
    python benchmarks/robustness.py --frontier_from runs/frontier_rl runs/frontier_base   # at matched forgetting
    python benchmarks/robustness.py --analyse_only --inputs runs/rob_a runs/rob_b --output_dir runs/robustness

Models: ``--models_from DIR`` reads a ``benchmarks/baselines.py`` output directory (its ``results.json``: the six
baselines GA, GA+GDR (GradDiff), NPO, SimNPO, IdkDPO, RMU at ``DIR/seed<s>/<method>``; RS, RULE and the default
ReRULE (``hard_case_fill``) at ``DIR/references/seed<s>/...``); ``--train`` first runs that benchmark into
``<output_dir>/models`` (resumable); ``--model NAME SEED PATH`` adds any model; ``--frontier_from DIR ...`` takes, from ``benchmarks/frontier.py
--keep_models`` runs, RS and each method's point chosen under ``--constraint`` (default forget accuracy ≤ 0.05
with retain ≥ 0.90 on the selection half): every method attacked at matched forgetting. The embedded target (before
unlearning) and retain (never saw the forget authors) models are attacked as two more rows, the controls
(``--no_controls`` drops them).

Every model gets the same ``rerule attack --config configs/embedded/attack.yaml`` (sampling leak@k, 8- and 4-bit
quantization, LoRA and full relearning on the first half of the forget authors, the six adversarial kinds),
with ``--seed`` = the model's seed, relearning on the model itself (the controls are rows of their own), one MLflow
run each. Resumable: each finished (method, seed) is recorded in ``<output_dir>/results.json``.

The table (``robustness.md`` / ``.csv``): per method, the greedy forget answer accuracy and the forget answer
accuracy each attack recovers, Δ against the same model unattacked (relearning: the held-out half at the best
step count against step 0), mean over seeds with a 95 % Student-t interval (``rerule_lightning.tracking.paired``);
``robustness.png`` plots the same Δs with their intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.records import RunRecords, merge_records  # noqa: E402

#: Baselines (benchmarks/baselines.py METHODS keys) and references (its REFERENCES) attacked by default.
BASELINES = ["GA", "GA+GDR", "NPO", "SimNPO", "IdkDPO", "RMU"]
REFERENCES = {"RS": "rejection steering", "RULE": "RULE", "ReRULE": "ReRULE (fill, group adv.)"}


def _tag(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def models_from(directory: str, seeds: list[int]) -> list[tuple[str, int, str]]:
    """``(name, seed, path)`` of every finished model of a ``benchmarks/baselines.py`` output directory."""
    out: list[tuple[str, int, str]] = []
    path = os.path.join(directory, "results.json")
    runs = json.load(open(path))["runs"] if os.path.exists(path) else []
    for r in runs:
        if r.get("kind") == "final" and r["method"] in BASELINES and r["seed"] in seeds:
            out.append((r["method"], r["seed"], os.path.join(directory, f"seed{r['seed']}", _tag(r["method"]))))
    ref = os.path.join(directory, "references", "results.json")
    stages = {v: k for k, v in REFERENCES.items()}
    for r in json.load(open(ref))["runs"] if os.path.exists(ref) else []:
        name = stages.get(r["stage"])
        if name is None or r["seed"] not in seeds:
            continue
        sub = "rs" if name == "RS" else os.path.join(r["preset"], _tag(r["stage"]))
        out.append((name, r["seed"], os.path.join(directory, "references", f"seed{r['seed']}", sub)))
    order = [*REFERENCES, *BASELINES]
    return sorted(out, key=lambda x: (order.index(x[0]), x[1]))


#: benchmarks/frontier.yaml method names attacked by ``--frontier_from`` (as the table names them).
FRONTIER_METHODS = {"RULE": "RULE", "ReRULE (fill, group adv.)": "ReRULE", "GA": "GA", "GradDiff": "GA+GDR",
                    "NPO": "NPO", "SimNPO": "SimNPO", "IdkDPO": "IdkDPO", "RMU": "RMU"}


def models_from_frontier(directories: list[str], seeds: list[int], constraint: str) -> list[tuple[str, int, str]]:
    """``(name, seed, path)`` of the models a ``benchmarks/frontier.py --keep_models`` run kept: per method of
    :data:`FRONTIER_METHODS` and seed, the point chosen under ``constraint`` (selection half, as the frontier
    table chooses it), and each seed's rejection-steered model (RS). A method that did not reach the constraint on
    a seed is left out, with a line on stderr.

    Raises:
        SystemExit: ``constraint`` is not one of the frontier's, a directory has no ``results.json``, or a chosen
            point's model was not kept (the message names the directory, method, seed and step).
    """
    from benchmarks import frontier_analysis as FA
    from rerule_lightning.tracking.frontier import choose

    by_name = {c.name: c for c in FA.CONSTRAINTS}
    if constraint not in by_name:
        raise SystemExit(f"benchmarks/robustness.py: error: --constraint {constraint!r}: choose one of {list(by_name)}")
    out: list[tuple[str, int, str]] = []
    for d in directories:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(f"benchmarks/robustness.py: error: --frontier_from {d!r}: no results.json there")
        with open(path) as f:
            runs = json.load(f)["runs"]
        for r in runs:
            if r.get("stage") == "rejection steering" and r["seed"] in seeds:
                out.append(("RS", r["seed"], os.path.join(d, f"seed{r['seed']}", "rs")))
        reports = {(r["key"], r["seed"], r["at"]): r for r in runs if r.get("kind") == "report"}
        for (method, seed), pts in FA._points([r for r in runs if r.get("kind") == "run"]).items():
            if method not in FRONTIER_METHODS or seed not in seeds:
                continue
            p = choose(pts, by_name[constraint])
            if p is None:
                print(f"robustness: {method} seed {seed}: {constraint} not reached, not attacked", file=sys.stderr)
                continue
            rep = reports.get((p["key"], seed, p["at"]))
            if rep is None or not rep.get("model_dir") or not os.path.isdir(rep["model_dir"]):
                raise SystemExit(f"benchmarks/robustness.py: error: {path}: {method} seed {seed} at {p['at']}: the "
                                 "chosen model was not kept (run benchmarks/frontier.py with --keep_models)")
            out.append((FRONTIER_METHODS[method], seed, rep["model_dir"]))
    order = [*REFERENCES, *BASELINES]
    return sorted(out, key=lambda x: (order.index(x[0]), x[1]))


def _row(table: list[dict[str, Any]], attack: str, setting: str, split: str, metric: str) -> dict[str, Any] | None:
    return next((r for r in table if (r["attack"], r["setting"], r["split"], r["metric"]) ==
                 (attack, setting, split, metric)), None)


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one ``attack.json``: greedy forget accuracy and the forget accuracy each attack recovers."""
    table = result["table"]
    out: dict[str, float] = {}

    def put(name: str, row: dict[str, Any] | None, field: str = "delta") -> None:
        out[name] = math.nan if row is None or row[field] is None else float(row[field])

    put("greedy forget accuracy", _row(table, "none", "greedy", "forget", "answer_accuracy"), "value")
    put("greedy forget refusal", _row(table, "none", "greedy", "forget", "refusal_rate"), "value")
    samp = result["attacks"].get("sampling", {}).get("settings", {})
    for setting, metrics in samp.items():
        k = max(int(key.rsplit("_", 1)[1]) for key in metrics if key.startswith("forget/leak_at_"))
        put(f"leak@{k} Δ", _row(table, "sampling", setting, "forget", f"leak_at_{k}"))
    for bits in result["attacks"].get("quantization", {}).get("settings", {}):
        put(f"{bits} Δ", _row(table, "quantization", bits, "forget", "answer_accuracy"))
    rel = result["attacks"].get("relearning", {}).get("settings", {})
    for peft in ("lora", "full"):
        rows = [_row(table, "relearning", s, "forget_second_half", "answer_accuracy") for s in rel
                if s.startswith(f"{peft}/model/steps_") and not s.endswith("/steps_0")]
        rows = [r for r in rows if r is not None and r["delta"] is not None]
        if rows:  # the attacker keeps the best step count (the held-out half peaks early, then interference sets in)
            put(f"relearn {peft} best Δ", max(rows, key=lambda r: r["delta"]))
    adv = [r for r in table if r["attack"] == "adversarial" and r["split"] == "forget" and r["metric"] == "answer_accuracy"]
    if adv:
        best = max(adv, key=lambda r: -math.inf if r["delta"] is None else r["delta"])
        put("adversarial best Δ", best)
    return out


class Robustness(RunRecords):
    """Records of attacked models."""

    def attack(self, name: str, seed: int, path: str) -> dict[str, Any]:
        rec = self.record(method=name, seed=seed)
        if rec is not None:
            return rec
        from rerule_lightning.cli.commands import main as cli_main

        a = self.args
        links = os.path.join(a.cache_dir, "embedded")
        out = os.path.join(a.output_dir, f"seed{seed}", _tag(name))
        t = time.perf_counter()
        rc = cli_main(["attack", "--config", a.config, "--model", path, "--data.init_args.world_dir",
                       os.path.join(links, "world"), "--relearning.models", "[model]", "--seed", str(seed),
                       "--output_dir", out, "--tracking_uri", a.tracking_uri, "--experiment", a.experiment,
                       "--run_name", f"{name}/seed{seed}", "--threads", str(a.threads), *a.attack_args])
        if rc:
            raise SystemExit(f"rerule attack failed for {name} seed {seed} (exit {rc})")
        with open(os.path.join(out, "attack.json")) as f:
            result = json.load(f)
        rec = {"method": name, "seed": seed, "path": path, "headline": headline(result),
               "run_id": result.get("mlflow_run_id"), "seconds": round(time.perf_counter() - t, 1)}
        self.save(rec)
        return rec


def summarise(runs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and one row per method: ``{column: PairedStat}`` over its seeds (order of first appearance)."""
    from rerule_lightning.tracking.paired import t_interval

    cols = list(dict.fromkeys(k for r in runs for k in r["headline"]))
    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        rows.append({"method": name, "n": len(mine), "seeds": sorted(r["seed"] for r in mine),
                     "stats": {c: t_interval([r["headline"].get(c, math.nan) for r in mine]) for c in cols}})
    return cols, rows


def _cell(s: Any, signed: bool = True) -> str:
    if not math.isfinite(s.mean):
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    if s.n < 2 or not math.isfinite(s.low):
        return f.format(s.mean)
    return f"{f.format(s.mean)} [{f.format(s.low)}, {f.format(s.high)}]"


def write_outputs(output_dir: str) -> list[str]:
    """robustness.md / .csv / .png from ``results.json`` (headlines recomputed from each model's attack.json when
    it is there, so a change of :func:`headline` needs no new attack); returns the paths."""
    with open(os.path.join(output_dir, "results.json")) as f:
        runs = json.load(f)["runs"]
    for r in runs:
        path = os.path.join(output_dir, f"seed{r['seed']}", _tag(r["method"]), "attack.json")
        if os.path.exists(path):
            with open(path) as f:
                r["headline"] = headline(json.load(f))
    cols, rows = summarise(runs)
    md = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    md += [f"| {r['method']} | {r['n']} | " + " | ".join(_cell(r["stats"][c], c.endswith("Δ")) for c in cols) + " |" for r in rows]
    note = ("\nForget answer accuracy (fraction of forget questions whose answer states the fact). Greedy columns: "
            "the model unattacked; Δ columns: recovered by the attack (value − unattacked; leak@k: some of k samples at "
            "temperature 1 states the fact, against greedy accuracy; relearning: the held-out half of the forget "
            "authors at the best of the step counts − step 0; adversarial best: the kind that recovers most). Mean over seeds "
            "[95 % Student-t interval].\n")
    paths = [os.path.join(output_dir, n) for n in ("robustness.md", "robustness.csv", "robustness.png")]
    with open(paths[0], "w") as f:
        f.write("# Robustness of unlearning (embedded world)\n\n" + "\n".join(md) + "\n" + note)
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "n", *[f"{c} {s}" for c in cols for s in ("mean", "low", "high")]])
        for r in rows:
            w.writerow([r["method"], r["n"], *[v for c in cols for v in (r["stats"][c].mean, r["stats"][c].low,
                                                                         r["stats"][c].high)]])
    plot(rows, [c for c in cols if c.endswith("Δ")], paths[2])
    return paths


def plot(rows: list[dict[str, Any]], cols: list[str], path: str) -> None:
    """Grouped bars: per attack, each method's mean Δ with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cols) + 2), 4.5))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(cols))]
        means = [r["stats"][c].mean for c in cols]
        err = [[max(0.0, m - r["stats"][c].low) if math.isfinite(r["stats"][c].low) else 0.0 for c, m in
                zip(cols, means)], [max(0.0, r["stats"][c].high - m) if math.isfinite(r["stats"][c].high) else 0.0
                                    for c, m in zip(cols, means)]]
        ax.bar(xs, [0.0 if not math.isfinite(m) else m for m in means], width, yerr=err, capsize=2, label=r["method"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols, rotation=20, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel("forget answer accuracy recovered (Δ)")
    ax.set_title("Forgotten or refused? Forget accuracy recovered by each attack (mean, 95 % interval)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models_from", default=None, help="a benchmarks/baselines.py output directory")
    ap.add_argument("--frontier_from", nargs="+", default=None,
                    help="benchmarks/frontier.py --keep_models output directories: attack RS and each method's point "
                         "chosen under --constraint (methods at matched forgetting)")
    ap.add_argument("--constraint", default="forget acc ≤ 0.05",
                    help="the frontier constraint whose chosen points --frontier_from attacks")
    ap.add_argument("--train", action="store_true", help="run benchmarks/baselines.py into <output_dir>/models first")
    ap.add_argument("--model", nargs=3, action="append", default=[], metavar=("NAME", "SEED", "PATH"),
                    help="attack this model too (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no_controls", action="store_true", help="do not attack the embedded target and retain models")
    ap.add_argument("--config", default="configs/embedded/attack.yaml")
    ap.add_argument("--attack_args", nargs=argparse.REMAINDER, default=[],
                    help="extra rerule attack flags (last on the line), e.g. --attack_args --max_new_tokens 24")
    ap.add_argument("--cache_dir", default=".cache/rerule", help="the prepared embedded world")
    ap.add_argument("--output_dir", default="runs/robustness")
    ap.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="rerule-robustness")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--analyse_only", action="store_true", help="attack nothing; rebuild outputs from results.json")
    ap.add_argument("--inputs", nargs="+", default=None,
                    help="with --analyse_only: first merge the results.json of these output directories (the "
                         "attacks run as several processes) into <output_dir>")
    args = ap.parse_args(argv)
    if args.inputs and not args.analyse_only:
        ap.error("--inputs is for --analyse_only (merging finished attacks)")
    if not (args.analyse_only or args.models_from or args.frontier_from or args.train or args.model
            or not args.no_controls):
        ap.error("nothing to attack: give --models_from, --frontier_from, --train or --model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.analyse_only:
        if args.inputs:
            merge_records(args.inputs, args.output_dir, lambda r: f"{r['method']} seed {r['seed']}",
                          "benchmarks/robustness.py")
        print("\n".join(write_outputs(args.output_dir)))
        return 0
    from rerule_lightning.cli.lightning_cli import pin_threads

    args.threads = pin_threads(args.threads)
    models: list[tuple[str, int, str]] = []
    if args.train:
        from benchmarks import baselines

        src = os.path.join(args.output_dir, "models")
        rc = baselines.main(["--seeds", *map(str, args.seeds), "--threads", str(args.threads), "--output_dir", src,
                             "--cache_dir", args.cache_dir, "--tracking_uri", args.tracking_uri,
                             "--methods", *BASELINES])
        if rc:
            return int(rc)
        models += models_from(src, args.seeds)
    if args.models_from:
        models += models_from(args.models_from, args.seeds)
    if args.frontier_from:
        models += models_from_frontier(args.frontier_from, args.seeds, args.constraint)
    models += [(n, int(s), p) for n, s, p in args.model]
    if not args.no_controls:
        links = os.path.join(args.cache_dir, "embedded")
        models += [(n, s, os.path.join(links, d)) for n, d in (("target (control)", "target"),
                                                               ("retain (control)", "retain")) for s in args.seeds]
    bench = Robustness(args)
    t0 = time.perf_counter()
    for i, (name, seed, path) in enumerate(models):
        rec = bench.attack(name, seed, path)
        print(f"[{i + 1}/{len(models)}] {name} seed {seed}: {rec['seconds']} s ({time.perf_counter() - t0:.0f} s in all)",
              file=sys.stderr, flush=True)
    print("\n".join(write_outputs(args.output_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
