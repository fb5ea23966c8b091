"""Mapping a JSON/TOML table onto one of the contract's frozen dataclasses, refusing in one
line that names the field (:mod:`edge_tl.spec`'s records, recipes and profiles all read
through :func:`_from_dict`).

Torch-free, a floor module.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from edge_tl.errors import EdgeTLError

__all__ = ["FIX"]


def _from_dict(cls: type, data: Any, where: str, fix: str = "write it as one") -> Any:
    """Build dataclass ``cls`` from ``data``, refusing in one line naming the field: data
    that is not a mapping, an unknown or missing field, and a value of the wrong type
    (:func:`_fits`: the field's annotation, containers included, numbers finite)."""
    if not isinstance(data, dict):
        raise EdgeTLError(f"{where}: {_short(data)} is not a table of fields; {fix}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise EdgeTLError(
            f"{where}: unknown field(s) {', '.join(_short(k) for k in unknown)}; "
            f"valid fields: {', '.join(sorted(names))}"
        )
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise EdgeTLError(f"{where}: missing field(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise EdgeTLError(
                f"{where}: {name} = {_short(value)} is not {_describe(hints[name])}; {fix}"
            )
    return cls(**data)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON/TOML fits the annotation ``hint``: numbers are finite
    (true/false is not a number), a tuple or list is a list (of the given length for a
    fixed tuple), a dict has string keys, a nested dataclass is a table (its own
    ``from_dict`` checks it), ``Any`` is anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return isinstance(value, int) or math.isfinite(value)  # a huge int overflows isfinite
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items()
        )
    raise TypeError(f"no rule for annotation {hint!r}")  # pragma: no cover - a new field type


def _describe(hint: Any) -> str:
    """``hint`` in a user's words: "a number", "a list of 3 numbers", "a table of strings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a table of {_plural(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
    }.get(hint, "a value")


def _plural(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "lists"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "tables"
    return {float: "finite numbers", int: "integers", str: "strings", bool: "true/false"}.get(
        hint, "values"
    )


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: one line, whatever the file holds."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more than 4300 digits
        return "a number too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


FIX = "write it as one"


def _one_of(where: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise EdgeTLError(
            f"{where}: {name} = {_short(value)} is not one of {', '.join(map(str, allowed))}"
        )
