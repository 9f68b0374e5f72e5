"""Atomic JSON writing (non-finite floats as ``null``), shared by eval reports and reference caches."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON (non-finite floats as ``null``) via a temporary file and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(_nan_to_none(obj), f, indent=2, allow_nan=False, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = ["write_json_atomic"]
