"""Keep a model for the methods that reached no frontier constraint: the point that forgets most with retain kept.

    python benchmarks/frontier_closest.py --from runs/frontier_base --methods GA RMU --seeds 0 1 2 \\
        --profile budget --threads 1 --output_dir runs/frontier_closest

``benchmarks/robustness.py --frontier_from`` attacks each method at the point chosen under a constraint; a method
that never meets it on a seed (GA and RMU under forget accuracy ≤ 0.05 in docs/RESULTS.md §11) has no model there.
This script gives it one, **not at matched forgetting**: per method and seed, among the frontier points that
``--from`` recorded (selection half) with retain accuracy ≥ ``--retain_floor``, the one with the lowest forget
accuracy (:func:`rerule_lightning.tracking.frontier.closest`; ties: higher same-family accuracy, then fewer
sequences). It is re-run to that step or epoch exactly as ``benchmarks/frontier.py`` re-runs a chosen point (same
arguments, checked equal to the recorded point), evaluated on the report half, and its model kept. Records go to
``<output_dir>/results.json`` (kind ``report``, resumable); the last line printed is the ``--model NAME SEED
PATH`` arguments for ``benchmarks/robustness.py`` (NAME: the method with `` (closest)``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.frontier import DEFAULT_SWEEP, PROFILES, FrontierBench, load_sweep  # noqa: E402
from benchmarks.frontier_analysis import _points  # noqa: E402
from rerule_lightning.tracking.frontier import FORGET_ACC, RETAIN_FLOOR, closest  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True,
                    help="a benchmarks/frontier.py output directory (its results.json holds the runs' points)")
    ap.add_argument("--methods", nargs="+", required=True, help="methods of the sweep (e.g. GA RMU)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--retain_floor", type=float, default=RETAIN_FLOOR, help="retain accuracy kept (selection half)")
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help="the sweep file the runs came from")
    ap.add_argument("--profile", choices=PROFILES, default=None, help="the profile the runs came from")
    ap.add_argument("--output_dir", default="runs/frontier_closest")
    ap.add_argument("--cache_dir", default=".cache/rerule", help="prepared world and models (as for the runs)")
    ap.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="rerule-frontier")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (as for the runs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prog = "benchmarks/frontier_closest.py: error:"
    path = os.path.join(args.source, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{prog} --from {args.source}: no results.json (run benchmarks/frontier.py there first)")
    if os.path.realpath(args.output_dir) == os.path.realpath(args.source):
        raise SystemExit(f"{prog} --output_dir must differ from --from (the frontier's own records stay as they are)")
    sweep = load_sweep(args.sweep, False, args.methods, args.profile)  # exits naming an unknown method
    specs = {s.key: s for s in sweep["runs"]}
    with open(path) as f:
        runs = [r for r in json.load(f)["runs"] if r.get("kind") == "run" and r["method"] in args.methods]
    unknown = sorted({r["key"] for r in runs} - set(specs))
    if unknown:
        raise SystemExit(f"{prog} {path}: runs {unknown} are not in {args.sweep} "
                         f"(profile {args.profile}); pass the --sweep / --profile they ran with")
    points = _points(runs)
    chosen = {}
    for method in args.methods:
        for seed in args.seeds:
            pts = points.get((method, seed))
            if not pts:
                raise SystemExit(f"{prog} {path}: no run of {method!r} on seed {seed}")
            p = closest(pts, args.retain_floor)
            if p is None:
                print(f"{method} seed {seed}: no point keeps retain accuracy ≥ {args.retain_floor}", file=sys.stderr)
            else:
                chosen[(method, seed)] = p
    from rerule_lightning.cli.lightning_cli import pin_threads

    args.threads = pin_threads(args.threads)
    args.keep_models = True
    bench = FrontierBench(args, sweep)
    model_args: list[str] = []
    for (method, seed), p in chosen.items():
        spec = specs[p["key"]]
        rs_dir = os.path.join(args.source, f"seed{seed}", "rs") if spec.family == "rl" else None
        rec = bench.report(spec, seed, rs_dir, p)
        print(f"{method} seed {seed}: {p['key']} at {p['at']}, selection forget accuracy "
              f"{p['select'][FORGET_ACC]:.3f}, report {rec['report'].get(FORGET_ACC, float('nan')):.3f}, "
              f"re-run equal: {rec['verified']}", file=sys.stderr)
        model_args += ["--model", f"{method} (closest)", str(seed), rec["model_dir"]]
    print(shlex.join(model_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
