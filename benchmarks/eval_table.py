"""Embedded reference table: several models side by side on every evaluation metric.

    python benchmarks/eval_table.py \
        --model target=.cache/rerule/embedded/target --model retain=.cache/rerule/embedded/retain \
        --report "rejection steering=runs/replay_bench/seed0/rs_eval/eval.json" \
        --report "RULE=runs/replay_bench/seed0/hard/rule_eval/eval.json" --out docs/eval_table.md

``--model NAME=DIR`` evaluates a saved model with ``rerule test --config configs/embedded/eval.yaml`` (timed:
the target is at most 60 s per model on every split); ``--report NAME=eval.json`` reuses an existing report.
Prints a Markdown table (rows: ``split/metric``; columns: models) and the wall-clock of each evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate(path: str, out: str) -> float:
    """Run ``rerule test`` on one model directory; returns wall-clock seconds of the whole command."""
    rerule = os.path.join(os.path.dirname(sys.executable), "rerule")
    t = time.perf_counter()
    proc = subprocess.run([rerule, "test", "--config", "configs/embedded/eval.yaml", "--trainer.logger", "false",
                           "--trainer.enable_progress_bar", "false", "--model.init_args.policy.name_or_path", path,
                           "--model.init_args.eval_report_path", out], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rerule test failed for {path}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="NAME=MODEL_DIR to evaluate now")
    ap.add_argument("--report", action="append", default=[], help="NAME=eval.json to reuse")
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args(argv)
    reports: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    tmp = tempfile.mkdtemp(prefix="rerule-eval-")
    for spec in args.model:
        name, path = spec.split("=", 1)
        out = os.path.join(tmp, f"{len(reports)}.json")
        seconds[name] = evaluate(path, out)
        reports[name] = json.load(open(out))
    for spec in args.report:
        name, path = spec.split("=", 1)
        reports[name] = json.load(open(path))
    names = list(reports)
    keys = sorted({k for r in reports.values() for k in r["aggregate"]})
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        cells = []
        for n in names:
            v = reports[n]["aggregate"].get(k)
            cells.append("–" if v is None else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"))
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    for n, s in seconds.items():
        print(f"evaluation wall-clock, {n}: {s:.1f} s (whole `rerule test` command, every split)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
