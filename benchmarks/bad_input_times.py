"""How long each class of bad input takes to fail: the bad-input tables of the test suite, timed.

    python benchmarks/bad_input_times.py             # writes docs/bad_input_times.md, prints it

Runs ``tests/test_bad_input.py`` and ``tests/test_bad_input_more.py`` (one pytest process, one torch thread)
with ``$RERULE_BAD_INPUT_TIMES`` set, so that each case appends the wall-clock of its ``rerule`` call (in-process,
imports already warm; building the bad input is not counted) to a CSV. Every case is also asserted by the
tests to leave no MLflow run, checkpoint or export behind, i.e. to fail before any training step. The table
groups cases by class (the case id's first word) with the number of cases, the median and the maximum.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "bad_input_times.md")
CLASSES = {
    "yaml": "config files (YAML: unknown key, type, tag, UTF-8, duplicate key / block, overlay with no effect)",
    "config": "a missing config file", "flag": "flag values", "world": "`rerule prepare` world parameters",
    "file": "saved world files", "ckpt": "`--ckpt_path` files", "knob": "numeric ranges (flags and YAML)",
    "model": "model / reference directories and tokenizer", "out": "outputs and the tracking store",
    "demo": "`rerule demo` settings", "report": "`rerule report` metrics",
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = os.path.join(tmp, "times.csv")
        env = {**os.environ, "RERULE_BAD_INPUT_TIMES": csv_path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_bad_input.py", "tests/test_bad_input_more.py"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
            return 1
        rows = [line.strip().split(",") for line in open(csv_path, encoding="utf-8") if line.strip()]
    by_class: dict[str, list[float]] = {}
    for name, _command, secs in rows:
        by_class.setdefault(name.split("_")[0], []).append(float(secs))
    lines = ["# Time to fail, per class of bad input", "",
             f"`python benchmarks/bad_input_times.py` on {platform.machine()} with {os.cpu_count()} CPU cores, "
             "no GPU, shared with other jobs (so the numbers vary between runs); one torch thread. Seconds of the "
             "in-process `rerule` call, from argv to the `rerule: error:` line; none reaches a training step "
             "(the tests assert that no MLflow run, checkpoint or export exists afterwards).", "",
             "| class | what | cases | median (s) | max (s) |", "|---|---|---:|---:|---:|"]
    for cls, secs in sorted(by_class.items()):
        lines.append(f"| {cls} | {CLASSES.get(cls, '')} | {len(secs)} | {statistics.median(secs):.2f} | "
                     f"{max(secs):.2f} |")
    text = "\n".join(lines) + "\n"
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
