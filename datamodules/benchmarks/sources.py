"""Loading benchmark rows (hub id or local directory) and validating them against an expected schema.

Local layout (also the hub layout: config = HF config name, split = HF split name)::

    <source>/<config>/<split>.jsonl      (or .json: a list of objects, several lists in a row as
                                          ``datasets``' ``to_json(lines=False)`` writes, or JSON lines; or .parquet)

A hub id (``"locuslab/TOFU"``) is loaded with ``datasets.load_dataset(source, config, split=split)``; call
that only from ``prepare_data`` / ``setup``. Every problem is a :class:`SchemaError` (a ``ValueError``, so the
CLI reports it as ``rerule: error: ...`` before training) naming dataset, config, split, row and field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

SUFFIXES = (".jsonl", ".json", ".parquet")
KINDS = ("text", "str", "int", "number", "text_list", "str_list")


class SchemaError(ValueError):
    """A benchmark row that does not match the expected schema.

    The message is ``"{dataset} config {config!r} split {split!r} row {row}: field {field!r}: {problem}"``
    (row and field left out when ``None``), followed by ``" (file {path})"`` for local data.
    """

    def __init__(self, dataset: str, config: str, split: str, row: int | None, field: str | None, problem: str,
                 path: str | None = None) -> None:
        self.dataset, self.config, self.split, self.row, self.field, self.problem, self.path = (
            dataset, config, split, row, field, problem, path)
        msg = f"{dataset} config {config!r} split {split!r}"
        if row is not None:
            msg += f" row {row}"
        if field is not None:
            msg += f": field {field!r}"
        msg += f": {problem}"
        if path:
            msg += f" (file {path})"
        super().__init__(msg)


def is_local(source: str) -> bool:
    """Whether ``source`` names a local directory (anything else is treated as a hub id)."""
    return os.path.isdir(os.path.expanduser(source))


def local_candidates(source: str, config: str, split: str) -> list[str]:
    """The files tried for ``(config, split)`` under a local ``source``, in order."""
    base = os.path.join(os.path.expanduser(source), config, split)
    return [base + s for s in SUFFIXES]


def _read_json_lines(path: str, dataset: str, config: str, split: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        line = 0
        with open(path, "rb") as fb:
            line = fb.read()[:err.start].count(b"\n")
        raise SchemaError(dataset, config, split, line, None, f"not valid UTF-8 ({err.reason})", path) from None
    stripped = text.lstrip()
    if path.endswith(".json") and stripped.startswith("["):
        return _read_json_arrays(text, path, dataset, config, split)
    rows: list[Any] = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise SchemaError(dataset, config, split, len(rows), None, f"bad JSON on line {i + 1}: {err.msg}",
                              path) from None
    return rows


def _read_json_arrays(text: str, path: str, dataset: str, config: str, split: str) -> list[Any]:
    """One JSON array, or several in a row: ``datasets``' ``to_json(lines=False)`` writes one array per 1000
    rows, one per line (public TOFU copies are laid out so); their rows are concatenated in order."""
    decoder, rows, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return rows
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise SchemaError(dataset, config, split, None, None, f"bad JSON: {err}", path) from None
        if not isinstance(value, list):
            line = text.count("\n", 0, pos) + 1
            raise SchemaError(dataset, config, split, len(rows), None, f"bad JSON on line {line}: expected a "
                              f"JSON array of rows (one or more), got {type(value).__name__}", path)
        rows.extend(value)


def _read_parquet(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def load_rows(source: str, config: str, split: str, dataset: str = "", cache_dir: str | None = None) -> list[dict]:
    """Rows of one ``(config, split)`` (see :func:`load_rows_with_path` for the file they came from)."""
    return load_rows_with_path(source, config, split, dataset=dataset, cache_dir=cache_dir)[0]


def load_rows_with_path(source: str, config: str, split: str, dataset: str = "", cache_dir: str | None = None,
                        ) -> tuple[list[dict], str | None]:
    """Rows of one ``(config, split)`` and the local file they came from (``None`` for the hub).

    Args:
        source: Hub id or local directory (see the module docstring for the layout).
        config: Dataset config name (``forget10``, ``raw``, ...).
        split: Split name (``train``, ``forget``, ...).
        dataset: Benchmark name for messages (defaults to ``source``).
        cache_dir: ``datasets`` cache directory for hub downloads.

    Raises:
        FileNotFoundError: A local source without the file (naming dataset, config, split and the paths tried).
        SchemaError: Undecodable bytes, bad JSON or a row that is not an object.
    """
    name = dataset or source
    if is_local(source):
        tried = local_candidates(source, config, split)
        path = next((p for p in tried if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"{name} config {config!r} split {split!r}: no data file; tried "
                                    + ", ".join(tried))
        rows = _read_parquet(path) if path.endswith(".parquet") else _read_json_lines(path, name, config, split)
    else:
        from rerule_lightning.primitives.policy import looks_local

        if looks_local(source):
            raise FileNotFoundError(f"{name} config {config!r} split {split!r}: source directory {source!r} "
                                    "not found (a hub id looks like 'org/name')")
        import datasets

        rows, path = list(datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)), None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise SchemaError(name, config, split, i, None, f"expected a JSON object, got {type(r).__name__}", path)
    return rows, path


def _check(value: Any, kind: str) -> str | None:
    """The problem with ``value`` for ``kind``, or ``None`` when it fits."""
    if kind == "text":
        if not isinstance(value, str):
            return f"expected non-empty text, got {type(value).__name__}"
        return None if value.strip() else "empty text"
    if kind == "str":
        return None if isinstance(value, str) else f"expected a string, got {type(value).__name__}"
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {type(value).__name__}"
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {type(value).__name__}"
    if kind in ("text_list", "str_list"):
        if not isinstance(value, (list, tuple)):
            return f"expected a list of strings, got {type(value).__name__}"
        if kind == "text_list" and not value:
            return "empty list"
        for j, v in enumerate(value):
            if not isinstance(v, str):
                return f"item {j}: expected a string, got {type(v).__name__}"
            if kind == "text_list" and not v.strip():
                return f"item {j}: empty text"
        return None
    raise ValueError(f"unknown schema kind {kind!r}; choose from {KINDS} (optional: kind + '?')")


def validate_rows(rows: Sequence[Mapping[str, Any]], schema: Mapping[str, str], *, dataset: str, config: str,
                  split: str, path: str | None = None) -> list[dict]:
    """Check every row against ``schema`` (``{field: kind}``; ``kind + "?"`` = optional, may be absent/None).

    Returns:
        The rows as plain dicts (unchanged values; extra fields kept).

    Raises:
        SchemaError: The first problem, naming dataset, config, split, row (0-based) and field; an empty
            split is ``row None, field None: no rows``.
    """
    for kind in schema.values():
        _check_kind(kind)
    if not rows:
        raise SchemaError(dataset, config, split, None, None, "no rows", path)
    out = []
    for i, row in enumerate(rows):
        for fld, kind in schema.items():
            optional = kind.endswith("?")
            base = kind.rstrip("?")
            value = row.get(fld)
            if fld not in row or value is None:
                if optional:
                    continue
                raise SchemaError(dataset, config, split, i, fld, "missing" if fld not in row else "is null", path)
            problem = _check(value, base)
            if problem:
                raise SchemaError(dataset, config, split, i, fld, problem, path)
        out.append(dict(row))
    return out


def _check_kind(kind: str) -> None:
    if kind.rstrip("?") not in KINDS:
        raise ValueError(f"unknown schema kind {kind!r}; choose from {KINDS} (optional: kind + '?')")


def load_validated(source: str, config: str, split: str, schema: Mapping[str, str], dataset: str = "",
                   cache_dir: str | None = None) -> list[dict]:
    """:func:`load_rows` then :func:`validate_rows` (messages name the local file when there is one)."""
    rows, path = load_rows_with_path(source, config, split, dataset=dataset, cache_dir=cache_dir)
    return validate_rows(rows, schema, dataset=dataset or source, config=config, split=split, path=path)


__all__ = ["KINDS", "SUFFIXES", "SchemaError", "is_local", "load_rows", "load_rows_with_path", "load_validated",
           "local_candidates", "validate_rows"]
