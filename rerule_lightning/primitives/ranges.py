"""Allowed ranges of numeric parameters, carried in their type hints: ``epsilon_low: UnitBelowOne = 0.2``.

A :class:`Range` rides in ``Annotated[float, Range(...)]``; jsonargparse ignores it when parsing and prints its
``repr`` in ``--help`` (``type: Annotated[float, in [0, 1)]``). Two readers check it:

* the constructor itself, in one call: ``errors = range_errors(type(self), locals())`` (so a value passed from
  Python is refused too), and
* ``rerule fit | validate | test`` before any class is built (:func:`rerule_lightning.cli.knobs.knob_errors`),
  naming the full flag: ``--model.init_args.epsilon_low=1.5: must be in [0, 1)``.

:func:`ranges_of` reads the ranges of a class (its ``__init__`` along the MRO, so a subclass inherits its
parent's ranges and may narrow them) or of a dataclass (its fields). Every float range also requires a finite
value unless it says otherwise (``nan > 0`` is false, so a plain comparison would let ``beta: .nan`` switch the
KL off). A module whose signatures carry ranges does not use ``from __future__ import annotations``: jsonargparse
drops ``Annotated`` from postponed (string) annotations, hence from ``--help``.
"""

import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


@dataclass(frozen=True)
class Range:
    """An allowed interval, plus special values that are always accepted (``None``, ``-1`` = no limit ...).

    Args:
        lo: Lower bound (``None``: unbounded).
        hi: Upper bound (``None``: unbounded).
        lo_open: Whether ``lo`` itself is excluded.
        hi_open: Whether ``hi`` itself is excluded.
        integer: Whether the value must be an integer.
        special: Values accepted outside the interval, with what they mean (shown in the message).
        reason: The message instead of the range (e.g. why the bound exists).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    special: tuple[tuple[Any, str], ...] = ()
    reason: str | None = None

    def __repr__(self) -> str:
        """What ``--help`` shows: ``in [0, 1)``, ``>= 1``, ``null (off) or >= 1``."""
        return self._interval()

    def _interval(self) -> str:
        if self.lo is not None and self.hi is not None:
            core = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            core = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            core = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            core = "finite"
        # an int is typed by jsonargparse; a bounded interval excludes nan and inf by itself
        kind = "" if self.integer or core == "finite" or (self.lo is not None and self.hi is not None) else \
            "finite and "
        extra = "".join(f"{_num(v) if v is not None else 'null'} ({what}) or " for v, what in self.special)
        return f"{extra}{kind}{core}"

    def describe(self) -> str:
        """``must be in [0, 1)``, ``must be finite and > 0``, ... (or the ``reason``)."""
        return self.reason or f"must be {self._interval()}"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed (``bool`` is never a number here)."""
        if any(value == v and type(value) is type(v) or (value is None and v is None) for v, _ in self.special):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def error(self, name: str, value: Any) -> str | None:
        """``name=value: must be ...`` when ``value`` (or, for a mapping, one of its values) is refused."""
        for key, v in value.items() if isinstance(value, Mapping) else [(None, value)]:  # one per label
            if not self.accepts(v):
                return f"{name}.{key}={v}: {self.describe()}" if key is not None else f"{name}={v}: {self.describe()}"
        return None


def _num(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


NULL = ((None, "off"),)
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)
COUNT_OR_NULL = Range(1, integer=True, special=NULL)
STEPS = Range(0, integer=True)
FRACTION_OPEN = Range(0, 1, lo_open=True, hi_open=True)
#: Rewards are in [0, 1] ({0, 0.5, 1} for the RULE rewards), and ROUGE recall too.
REWARD = Range(0, 1)
#: ``collect_steps`` / ``replay_start``: a step count (int >= 0) or a fraction of ``max_steps`` (float in [0, 1]).
COLLECT = Range(0, special=NULL)
SCHEDULE = Range(0, special=NULL + (("adaptive", "from the zero-variance fraction"),))

# Named types for signatures (``jsonargparse`` parses the first argument, the range is metadata).
Positive = Annotated[float, POSITIVE]
NonNegative = Annotated[float, NON_NEGATIVE]
Count = Annotated[int, COUNT]
CountOrNull = Annotated[int, COUNT_OR_NULL] | None
Steps = Annotated[int, STEPS]
AtLeastTwo = Annotated[int, Range(2, integer=True)]
Unit = Annotated[float, REWARD]
UnitOpen = Annotated[float, FRACTION_OPEN]
UnitBelowOne = Annotated[float, Range(0, 1, hi_open=True)]
UnitAboveZero = Annotated[float, Range(0, 1, lo_open=True)]
#: GRPO's G, completions per prompt; its dual-clip constant c > 1.
GroupSize = Annotated[int, Range(2, integer=True, reason="GRPO needs at least 2 completions per prompt")]
DualClip = Annotated[float, Range(1, lo_open=True, special=NULL)] | None
CollectSteps = Annotated[int | float, COLLECT] | None
ReplayStart = Annotated[int | float | Literal["adaptive"], SCHEDULE]


def range_of(hint: Any) -> Range | None:
    """The :class:`Range` in a type hint (``Annotated[...]``, also inside ``X | None``), else ``None``."""
    if typing.get_origin(hint) is Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Range)), None)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next((r for a in typing.get_args(hint) if (r := range_of(a)) is not None), None)
    return None


def _hints(obj: Any) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(obj, include_extras=True)
    except Exception:  # noqa: BLE001 - a foreign class whose hints do not resolve carries no range of ours
        return {}
    hints.pop("return", None)
    return hints


def _own_inits(cls: type) -> list[Callable[..., Any]]:
    """The ``__init__`` functions along the MRO, farthest base first."""
    return [init for klass in reversed(cls.__mro__) if inspect.isfunction(init := klass.__dict__.get("__init__"))]


@functools.cache
def hints_of(obj: type | Callable[..., Any]) -> dict[str, Any]:
    """The parameters' type hints of a class's ``__init__`` (nearest class wins along the MRO), of a dataclass's
    fields or of a function."""
    if not isinstance(obj, type) or dataclasses.is_dataclass(obj):
        return _hints(obj)
    return {k: v for init in _own_inits(obj) for k, v in _hints(init).items()}


@functools.cache
def ranges_of(obj: type | Callable[..., Any]) -> dict[str, Range]:
    """Parameter -> :class:`Range` of a class (``__init__`` along the MRO: a subclass inherits its parent's
    ranges, and a range it declares itself wins), of a dataclass (its fields) or of a function."""
    if not isinstance(obj, type) or dataclasses.is_dataclass(obj):
        return {k: r for k, h in _hints(obj).items() if (r := range_of(h)) is not None}
    return {k: r for init in _own_inits(obj) for k, h in _hints(init).items() if (r := range_of(h)) is not None}


def range_errors(obj: type | Callable[..., Any], values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``prefix + name=value: must be ...`` for every value outside its annotated range, in signature order.

    Args:
        obj: The class, dataclass or function whose annotations hold the ranges.
        values: Parameter values (``locals()`` at the top of ``__init__`` works; other names are ignored).
        prefix: Put before each name (``data.``, ``policy.``).
    """
    return [msg for name, rule in ranges_of(obj).items()
            if name in values and (msg := rule.error(prefix + name, values[name])) is not None]
