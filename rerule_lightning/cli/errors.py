"""jsonargparse's nested error text as one line naming the flag (what ``rerule: error: ...`` prints).

:func:`one_line_error` turns union-subtype explanations and the dump of the resolved ``Namespace`` into e.g.
``--model.init_args.num_generations=1: GRPO needs at least 2 completions per prompt``; :class:`ConfigError` is an
error already in that form. Used by :mod:`rerule_lightning.cli.lightning_cli` (and re-exported there).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config / flag error, already one line naming the flag (the ``rerule`` entry point prints it)."""


_UNION = "Does not validate against any of the Union subtypes"
#: Alternatives of a union that never explain the failure (``Optional[...]``'s ``None``, a list form).
_NOISE = ("Expected a <class 'NoneType'>", "Not a valid subclass of", "Expected a <class 'list'>",
          "Expected a list")
_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_ITEM = re.compile(r"(?P<name>[A-Za-z_][\w.]*)(?P<rest>=.*|: .*)", re.S)


def is_jsonargparse_error(text: str) -> bool:
    """Whether ``text`` has the shape of jsonargparse's nested validation messages."""
    head = text.lstrip()
    return head.startswith((_UNION, "Parser key ", "Problem with given class_path"))


def _dedent(lines: list[str]) -> list[str]:
    lines = [ln.rstrip() for ln in lines if ln.strip()]
    if not lines:
        return []
    n = min(len(ln) - len(ln.lstrip()) for ln in lines)
    return [ln[n:] for ln in lines]


def _union_entries(lines: list[str]) -> tuple[list[list[str]], str | None]:
    """The ``Errors:`` entries of a union block (each a list of lines) and its ``Given value``."""
    entries: list[list[str]] = []
    given, inside = None, False
    for ln in lines:
        indent = len(ln) - len(ln.lstrip())
        if indent == 0:
            inside = ln.startswith("Errors:")
            if ln.startswith("Given value:"):
                given = ln.split(":", 1)[1].strip()
            continue
        if inside and ln.lstrip().startswith("- ") and indent <= 2:
            entries.append([ln.lstrip()[2:]])
        elif inside and entries:
            entries[-1].append(ln)
    return entries, given


def _walk(lines: list[str], keys: list[str], ctx: dict[str, Any]) -> tuple[list[str], str]:
    """Descend jsonargparse's message to its innermost meaningful line: ``(key path, that line)``."""
    lines = _dedent(lines)
    if not lines:
        return keys, ""
    head, body = lines[0].strip(), lines[1:]
    m = re.fullmatch(r'Parser key "([^"]+)":', head)
    if m:
        return _walk(body, keys + m.group(1).split("."), ctx)
    m = re.fullmatch(r"Problem with given class_path '([^']+)':", head)
    if m:
        ctx["class_path"] = m.group(1)
        return _walk(body, keys + ["init_args"], ctx)
    if head.startswith(_UNION):
        entries, given = _union_entries(lines)
        if given is not None:
            ctx["given"] = given
            cp = re.search(r"class_path='([^']+)'", given)
            if cp and "class_path" not in ctx:
                ctx["class_path"] = cp.group(1)
        useful = [e for e in entries if not e[0].startswith(_NOISE)] or entries
        return _walk(useful[0], keys, ctx) if useful else (keys, head)
    return keys, " ".join(ln.strip() for ln in lines)


def _pretty_type(t: str) -> str:
    m = re.fullmatch(r"typing\.Literal\[(.*)\]", t)
    if m:
        return f"one of {m.group(1)}"
    return re.sub(r"<class '([^']+)'>", r"\1", t)


def _flag(keys: list[str]) -> str:
    if keys and keys[0] in _SUBCOMMANDS:
        keys = keys[1:]
    return "--" + ".".join(keys)


def _locate(config: Any, class_name: str | None, class_path: str | None) -> tuple[str, Mapping[str, Any]] | None:
    """The dotted config key of the component with this class (``model``, ``data``, ``trainer.callbacks``)
    and its ``init_args``."""
    if config is None or not (class_name or class_path):
        return None
    cfg = config.as_dict() if hasattr(config, "as_dict") else config

    def matches(node: Mapping[str, Any]) -> bool:
        cp = str(node.get("class_path") or "")
        return bool(cp) and (cp == class_path or (class_name is not None and cp.rsplit(".", 1)[-1] == class_name))

    def visit(node: Any, path: list[str]) -> tuple[str, Mapping[str, Any]] | None:
        if isinstance(node, Mapping):
            if matches(node):
                return ".".join(path), node.get("init_args") or {}
            for k, v in node.items():
                found = visit(v, path + [str(k)])
                if found:
                    return found
        elif isinstance(node, (list, tuple)):
            for v in node:
                found = visit(v, path)
                if found:
                    return found
        return None

    return visit(cfg, [])


def _name_items(text: str, ctx: dict[str, Any], config: Any) -> str:
    """A validator's own message (``[ClassName: ]name=value: reason; ...``) with each name as its full flag."""
    m = re.match(r"([A-Z][A-Za-z0-9_]*): (.+)", text, re.S)
    class_name, text = (m.group(1), m.group(2)) if m else (None, text)
    where = _locate(config, class_name, ctx.get("class_path"))
    if where is None:
        return f"{class_name}: {text}" if class_name else text
    group, init_args = where
    parts = group.split(".")
    if parts and parts[0] in _SUBCOMMANDS:
        parts = parts[1:]
    group = ".".join(parts)
    items: list[str] = []
    for seg in text.split("; "):
        if _ITEM.match(seg) or not items:
            items.append(seg)
        else:
            items[-1] += "; " + seg
    out = []
    for item in items:
        im = _ITEM.match(item)
        if im:
            names = im.group("name").split(".")
            if len(names) > 1 and names[0] == parts[-1] and names[1] in init_args:  # "data.batch_size=..."
                names = names[1:]
            if names[0] in init_args:
                item = f"--{group}.init_args.{'.'.join(names)}{im.group('rest')}"
        out.append(item)
    line = "; ".join(out)
    if group.endswith("callbacks") and class_name:  # a list: say which callback
        line += f" ({class_name})"
    return line


def one_line_error(text: str, config: Any = None) -> str:
    """jsonargparse's (possibly nested, many-line) error message as one line naming the flag.

    Args:
        text: The message of jsonargparse's ``ArgumentError`` (parsing) or ``ValueError`` (instantiation).
        config: The parsed config, to name the flag of a component's own validation error (which names
            only its argument, e.g. ``num_generations=1: ...``).

    Returns:
        E.g. ``--model.init_args.num_generations=1: GRPO needs at least 2 completions per prompt`` or
        ``--data.init_args.preset=medium: expected one of 'easy', 'hard'``; text of another shape with its
        lines joined.
    """
    text = text.strip()
    m = re.fullmatch(r"the following arguments are required: (.+)", text)
    if m:
        flags = ", ".join(_flag(k.strip().split(".")) for k in m.group(1).split(","))
        return f"{flags}: required, but neither a --config file nor a flag sets it"
    if not is_jsonargparse_error(text):
        return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    ctx: dict[str, Any] = {}
    keys, leaf = _walk(text.splitlines(), [], ctx)
    m = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", leaf, re.S)
    if m:
        return f"{_flag(keys)}={m.group(2)}: expected {_pretty_type(m.group(1))}"
    m = re.fullmatch(r"Expected a (.+)", leaf, re.S)
    if m and keys:
        given = ctx.get("given")
        value = f"={given}" if given is not None and "Namespace(" not in given else ""
        return f"{_flag(keys)}{value}: expected {_pretty_type(m.group(1))}"
    m = re.fullmatch(r"Option '([^']+)' is not accepted", leaf)
    if m:
        owner = ctx.get("class_path")
        return f"{_flag(keys + [m.group(1)])}: not an option of {owner}" if owner else \
            f"{_flag(keys + [m.group(1)])}: unknown option"
    if keys:
        return f"{_flag(keys)}: {leaf}"
    return _name_items(leaf, ctx, config)


# ------------------------------------------------------------------------------------------- commands
