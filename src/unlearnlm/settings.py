"""Settings dataclasses built from plain mappings (YAML, ``key=value`` overrides), with errors that name the key.

Below both the methods (whose settings classes use it) and the run configuration (``config.py``),
so that neither has to import the other to validate its settings.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

from unlearnlm.errors import UserError


def bounded(default: Any, *, at_least: float | None = None, above: float | None = None,
            below: float | None = None, at_most: float | None = None) -> Any:
    """A dataclass field whose value (or each item of a list value) must lie in the given range.

    Checked when the config loads, so a bad value fails in a second with the key's name, not
    after a model has loaded or, worse, after training (a zero chunk size, a negative rate).
    """
    limits = {name: value for name, value in (("at_least", at_least), ("above", above), ("below", below),
                                              ("at_most", at_most)) if value is not None}
    return field(default=default, metadata={"bounds": limits})


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error says more
            return _check_value(value, options[0], key)
        for option in options:
            try:
                return _check_value(value, option, key)
            except UserError:
                continue
        raise UserError(f"setting {key!r}: {value!r} is not a valid value")
    if origin is Literal:
        if value not in args:
            raise UserError(f"setting {key!r}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"setting {key!r}: expected a list, got {value!r}")
        return [_check_value(item, args[0], key) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"setting {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, prefix=key)
    if annotation is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        # YAML 1.1 reads '5e-5' (no dot) as a string; accept it as the number it plainly is.
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"setting {key!r}: expected a number, got {value!r}") from None
        return _check_value(number, float, key)  # '1e400' reads as infinity
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"setting {key!r}: must be a finite number, got {value!r}")
    if annotation is bool and not isinstance(value, bool):
        raise UserError(f"setting {key!r}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"setting {key!r}: expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise UserError(f"setting {key!r}: expected {annotation.__name__}, got {value!r}")
    return value


def build_dataclass(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Instantiate ``cls`` from ``data``; unknown or ill-typed keys raise UserError naming the key."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"setting {prefix or cls.__name__!r}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise UserError(f"unknown setting {where!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _check_value(value, hints[name], key)
        _check_bounds(values[name], fields[name].metadata.get("bounds", {}), key)
    return cls(**values)


def _check_bounds(value: Any, bounds: dict[str, float], key: str) -> None:
    for item in value if isinstance(value, list) else [value]:
        if item is None:
            continue
        if "at_least" in bounds and item < bounds["at_least"]:
            raise UserError(f"setting {key!r}: must be at least {bounds['at_least']}, got {item!r}")
        if "above" in bounds and item <= bounds["above"]:
            raise UserError(f"setting {key!r}: must be above {bounds['above']}, got {item!r}")
        if "below" in bounds and item >= bounds["below"]:
            raise UserError(f"setting {key!r}: must be below {bounds['below']}, got {item!r}")
        if "at_most" in bounds and item > bounds["at_most"]:
            raise UserError(f"setting {key!r}: must be at most {bounds['at_most']}, got {item!r}")
