"""The results file of a resumable benchmark: ``<output_dir>/results.json`` holding the settings and one record
per finished unit of work, rewritten atomically after each, so a stopped benchmark resumes where it was."""

from __future__ import annotations

import argparse
import json
import os
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
