"""The results file of a resumable benchmark: ``<output_dir>/results.json`` holding the settings and one record
per finished unit of work, rewritten atomically after each, so a stopped benchmark resumes where it was."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any


class RunRecords:
    """Finished runs of a benchmark, loaded from and saved to ``<args.output_dir>/results.json``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        os.makedirs(args.output_dir, exist_ok=True)
        self.path = os.path.join(args.output_dir, "results.json")
        self.runs: list[dict[str, Any]] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.runs = json.load(f)["runs"]

    def record(self, **key: Any) -> dict[str, Any] | None:
        """The first finished run whose fields equal ``key`` (``None``: not run yet)."""
        return next((r for r in self.runs if all(r.get(k) == v for k, v in key.items())), None)

    def save(self, record: dict[str, Any]) -> None:
        """Append a finished run and rewrite the file atomically (with the settings of this invocation)."""
        self.runs.append(record)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": vars(self.args), "runs": self.runs}, f, indent=1)
        os.replace(tmp, self.path)


def merge_records(inputs: list[str], output_dir: str, unit: Callable[[dict[str, Any]], str | None],
                  prog: str) -> str:
    """Write ``<output_dir>/results.json`` holding every record of the ``results.json`` of each input directory
    (one benchmark run as several processes, each with its own ``--output_dir``); returns its path. Everything is
    checked before anything is written.

    Args:
        inputs: Output directories of the processes, in order (their records are concatenated in that order).
        output_dir: Where the merged file goes (created).
        unit: Names a record's unit of work (e.g. ``"run 'RULE|lr=1|60' seed 0"``), or ``None`` for records that
            may repeat; a unit found in two inputs is an error.
        prog: The program named in error messages.

    Raises:
        SystemExit: An input has no ``results.json``, or two inputs hold the same unit of work (the message names
            both files and the unit).
    """
    runs: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    settings = []
    for d in inputs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{prog}: error: --inputs {d!r}: no results.json there")
        with open(path) as f:
            data = json.load(f)
        settings.append({"input": d, **data.get("settings", {})})
        for r in data["runs"]:
            name = unit(r)
            if name is not None and name in seen and seen[name] != path:
                raise SystemExit(f"{prog}: error: {path}: {name} is also in {seen[name]}")
            if name is not None:
                seen.setdefault(name, path)
            runs.append(r)
    os.makedirs(output_dir, exist_ok=True)
    out = os.path.join(output_dir, "results.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"settings": {"merged": settings}, "runs": runs}, f, indent=1)
    os.replace(tmp, out)
    return out
