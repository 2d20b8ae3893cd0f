"""JSON read back into typed dataclasses, each value checked against its field's type: finite
numbers, counts >= 0, intervals as pairs, no unknown or missing field. metrics.json's rows and
sections are read through here (``results.py`` declares them)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

Interval = list[float | None]  # a 95% interval [low, high]; None where no draw was finite
Count = typing.NewType("Count", int)  # a whole number >= 0
T = TypeVar("T")


def part_type(cls: type, name: str) -> type:
    """The dataclass a field holds (``X | None`` -> X)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build(kind: type[T], given: dict[str, Any], prefix: str = "") -> T:
    """A ``kind`` dataclass from JSON values, each checked against its field's type."""
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(given) - set(hints))
    if unknown:
        raise ValueError(f"{prefix + unknown[0]} is not a field")
    for f in dataclasses.fields(kind):  # type: ignore[arg-type]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in given:
            if required:
                raise ValueError(f"{prefix + f.name} is missing")
            continue
        if not is_of(given[f.name], hints[f.name]):
            raise ValueError(f"{prefix + f.name} is not a {describe(hints[f.name])}")
    values = {name: _convert(value, hints[name]) for name, value in given.items()}
    return kind(**values)


def is_of(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type: numbers finite, intervals pairs."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(is_of(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is Count:
        return type(value) is int and value >= 0
    if hint in (int, bool, str, list):
        return type(value) is hint
    if hint == Interval:
        return (
            isinstance(value, list)
            and len(value) == 2
            and all(is_of(v, float | None) for v in value)
        )
    if hint is Any:
        return True
    if origin is dict:
        return isinstance(value, dict)
    if origin is list and dataclasses.is_dataclass(args[0]):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is list:
        return isinstance(value, list) and all(is_of(v, args[0]) for v in value)
    raise TypeError(f"no check for {hint}")


def _fits(value: Any, kind: type) -> bool:
    if not isinstance(value, dict):
        return False
    try:
        build(kind, value)
    except ValueError:
        return False
    return True


def _convert(value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
        return [build(args[0], v) for v in value]
    return value


NAMES = {float: "finite number", int: "whole number", Count: "count", bool: "bool", str: "str"}


def describe(hint: Any) -> str:
    """A field's type in words, for the error that names it."""
    if hint in (Interval, Interval | None):
        return "interval [low, high]"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and len(args) == 1:
        return f"{describe(args[0])} or null"
    if typing.get_origin(hint) is list:
        return f"list of {getattr(args[0], '__name__', args[0])}"
    return NAMES.get(hint, getattr(hint, "__name__", str(hint)))
