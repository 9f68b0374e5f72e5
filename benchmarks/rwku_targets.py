"""RWKU as RULE reports it: single-target unlearning of several targets, one at a time, each from the original
model, with the per-target metrics and their mean in one table.

    python benchmarks/rwku_targets.py --targets 1-10 --out runs/rwku_targets            # RULE's targets 1-10
    python benchmarks/rwku_targets.py --targets "Stephen King" "Bruce Lee" --replay      # ReRULE on two targets

For each target T (a ``forget_target`` name, or its 1-based row number in the source, as RULE numbers its
folders) the three shipped stages run in this process through ``rerule``'s own entry point, with only the target
and the output paths changed (``--rs-args`` / ``--rule-args`` / ``--eval-args`` add overrides to one stage, e.g.
a local source or a smaller model; quoted, split like a shell line):

1. ``rerule fit --config configs/rwku/rs.yaml``: rejection steering of the original model on T, exported to
   ``<out>/<T>/rs``;
2. ``rerule fit --config configs/rwku/rule.yaml`` (``--replay``: plus ``configs/replay/hard_case.yaml``) from
   that export (its KL reference), exported to ``<out>/<T>/rule``;
3. ``rerule test --config configs/rwku/eval.yaml`` on the RULE export and T's probes, report
   ``<out>/<T>/eval.json`` (``--with-original``: also the original model, ``<out>/<T>/original.json``).

Writes ``<out>/table.md`` and ``<out>/table.json``: one row per target (forget levels 1-3, neighbour levels 1-2,
fluency; RWKU's ROUGE-L recall, the ``rouge`` package's semantics) and their mean. A stage that fails stops the
run with its exit status. RULE's published RWKU numbers (REFERENCE.md) are means over its targets with full
fine-tuning of Llama-3-8B-Instruct; the shipped configs use QLoRA (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

COLUMNS = ("forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2", "fluency")


def resolve_targets(specs: Sequence[str], names: Sequence[str]) -> list[str]:
    """Target names from names, 1-based row numbers (``3``) or ranges (``1-10``) of ``forget_target``."""
    out: list[str] = []
    for s in specs:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", s.strip())
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if not 1 <= lo <= hi <= len(names):
                raise ValueError(f"--targets {s!r}: rows 1..{len(names)} exist in forget_target")
            out += list(names[lo - 1:hi])
        elif s in names:
            out.append(s)
        else:
            raise ValueError(f"--targets {s!r}: not a forget_target name or row number")
    return list(dict.fromkeys(out))


def slug(name: str) -> str:
    """A directory name for a target (RWKU's folder style: spaces to underscores, other separators dropped)."""
    return re.sub(r"[^\w.-]", "", name.replace(" ", "_")) or "target"


def stage_commands(target: str, out: str, replay: bool, extra: dict[str, Sequence[str]], with_original: bool,
                   configs: str = "configs/rwku") -> list[tuple[str, list[str]]]:
    """``(name, rerule argv)`` of each stage for one target (see the module docstring)."""
    d = os.path.join(out, slug(target))
    tgt = json.dumps([target])
    rs = ["fit", "--config", f"{configs}/rs.yaml", "--data.init_args.benchmark.init_args.targets", tgt,
          "--model.init_args.export_dir", f"{d}/rs", "--trainer.default_root_dir", f"{d}/rs_logs", *extra.get("rs", ())]
    rule = ["fit", "--config", f"{configs}/rule.yaml", *(["--config", "configs/replay/hard_case.yaml"] if replay else []),
            "--data.init_args.targets", tgt, "--model.init_args.policy.name_or_path", f"{d}/rs",
            "--model.init_args.export_dir", f"{d}/rule", "--trainer.default_root_dir", f"{d}/rule_logs", *extra.get("rule", ())]
    ev = ["test", "--config", f"{configs}/eval.yaml", "--data.init_args.targets", tgt,
          "--trainer.default_root_dir", f"{d}/eval_logs", *extra.get("eval", ())]
    stages = [("rs", rs), ("rule", rule),
              ("eval", [*ev, "--model.init_args.policy.name_or_path", f"{d}/rule",
                        "--model.init_args.eval_report_path", f"{d}/eval.json"])]
    if with_original:
        stages.append(("original", [*ev, "--model.init_args.eval_report_path", f"{d}/original.json"]))
    return stages


def headline(report: dict) -> dict[str, float]:
    """The six RWKU numbers of an eval report (``rwku/<split>`` aliases)."""
    agg = report["aggregate"]
    return {c: float(agg[f"rwku/{c}"]) for c in COLUMNS}


def table(rows: dict[str, dict[str, float]]) -> tuple[str, dict]:
    """Markdown table (targets, then their mean) and its JSON form; ROUGE-L recall in percent as RWKU prints."""
    mean = {c: sum(r[c] for r in rows.values()) / len(rows) for c in COLUMNS}
    def fmt(c: str, v: float) -> str:
        return f"{v:.2f}" if c == "fluency" else f"{100 * v:.1f}"

    lines = ["| target | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in [*rows.items(), ("mean", mean)]:
        label = f"**{name}**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(fmt(c, r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n", {"targets": rows, "mean": mean}


def target_names(source: str, cache_dir: str | None = None) -> list[str]:
    """``forget_target`` names of ``source`` (hub id or local directory), in row order."""
    from datamodules.benchmarks.sources import load_rows

    return [r["target"] for r in load_rows(source, "forget_target", "train", cache_dir=cache_dir)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["1-10"], help="names, row numbers or ranges (default 1-10)")
    ap.add_argument("--source", default="jinzhuoran/RWKU", help="where forget_target is read to resolve numbers")
    ap.add_argument("--out", default=".cache/rerule/runs/rwku_targets", help="output directory")
    ap.add_argument("--replay", action="store_true", help="ReRULE: add configs/replay/hard_case.yaml to stage 2")
    ap.add_argument("--with-original", action="store_true", help="also evaluate the original model per target")
    ap.add_argument("--configs", default="configs/rwku", help="directory with rs.yaml, rule.yaml, eval.yaml")
    for stage in ("rs", "rule", "eval"):
        ap.add_argument(f"--{stage}-args", default="", help=f"overrides appended to the {stage} stage (one string)")
    args = ap.parse_args(argv)
    extra = {s: shlex.split(getattr(args, f"{s}_args")) for s in ("rs", "rule", "eval")}
    from rerule_lightning.cli.commands import main as rerule

    targets = resolve_targets(args.targets, target_names(args.source))
    rows, before = {}, {}
    for t in targets:
        for name, cmd in stage_commands(t, args.out, args.replay, extra, args.with_original, args.configs):
            print(f"[{t}] {name}: rerule {' '.join(cmd)}", flush=True)
            rc = rerule(cmd)
            if rc:
                print(f"[{t}] stage {name} failed with exit status {rc}", file=sys.stderr)
                return rc
        d = os.path.join(args.out, slug(t))
        with open(os.path.join(d, "eval.json")) as f:
            rows[t] = headline(json.load(f))
        if args.with_original:
            with open(os.path.join(d, "original.json")) as f:
                before[t] = headline(json.load(f))
    md, data = table(rows)
    if before:
        md_before, data["original"] = table(before)
        md = "After RULE:\n\n" + md + "\nOriginal model:\n\n" + md_before
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(data, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
