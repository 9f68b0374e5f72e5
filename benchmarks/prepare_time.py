"""Wall-clock and peak memory of ``rerule prepare`` on the default embedded config, from an empty cache.

    python benchmarks/prepare_time.py --rebuild  # training locally; targets: <= 180 s, <= 4 GB peak RSS on 2 cores
    python benchmarks/prepare_time.py            # what a user gets: the shipped reference build, verified and copied

Runs the real CLI in a child process with a fresh temporary cache and reads the child's peak resident set
size from ``getrusage(RUSAGE_CHILDREN)``. Prints one JSON line and exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help="train the models locally (rerule prepare --rebuild)")
    args = ap.parse_args(argv)
    rerule = os.path.join(os.path.dirname(sys.executable), "rerule")
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        proc = subprocess.run([rerule, "prepare", "--config", "configs/embedded/prepare.yaml", "--cache_dir", cache,
                               "--progress", "false", *(["--rebuild"] if args.rebuild else [])], cwd=ROOT,
                              capture_output=True, text=True)
        secs = time.perf_counter() - t
        manifest = json.load(open(os.path.join(cache, "embedded", "manifest.json"))) if proc.returncode == 0 else {}
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    out = {"rebuild": args.rebuild, "source": manifest.get("source"), "wall_clock_s": round(secs, 1), "peak_rss_gb": round(peak_gb, 2), "rc": proc.returncode,
           "steps_s": manifest.get("seconds"), "cpus": os.cpu_count(), "machine": platform.platform(),
           "target_min_exact_match": min((m["exact_match"] for s, m in manifest.get("accuracy", {}).get("target", {}).items()),
                                         default=None),
           "retain_forget_answer_accuracy": manifest.get("accuracy", {}).get("retain", {}).get("forget", {}).get(
               "answer_accuracy")}
    print(json.dumps(out))
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    return 0 if secs <= 180 and peak_gb <= 4 else 1


if __name__ == "__main__":
    sys.exit(main())
