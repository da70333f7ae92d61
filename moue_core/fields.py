"""The one field checker of moue's frozen configs (``ModelConfig``, ``TrainConfig``, ``DataConfig``, ...).

Each check raises ``ConfigError(field, value, allowed)``: one line naming the field, the value and
what is accepted. ``build`` is the edge where a plain dict (TOML, ``--set``, Ray's config, a JSON
record) becomes a config: unknown keys are an error naming the key and the allowed ones, and values
are coerced the way TOML needs (an integer where a float is expected, a whole float where an integer
is, a list where a tuple is); a boolean field takes only ``true``/``false``.

Pure Python (no torch): configs are imported and validated by search spaces and spec loading.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from moue.errors import ConfigError

__all__ = ["integer", "number", "choice", "is_int", "build"]

T = TypeVar("T")


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (TOML's ``true`` is never a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(field: str, value: Any, low: int) -> None:
    """``value`` must be an integer ``>= low``."""
    if not is_int(value) or value < low:
        raise ConfigError(field, value, f"must be an integer >= {low}")


def number(field: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False,
           finite: bool = True) -> None:
    """``value`` must be a (finite) number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (math.isfinite(value) or not finite)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if ok:
        return
    if math.isinf(high):
        kind = "a finite number" if finite else "a number"
        raise ConfigError(field, value, f"must be {kind} {'>' if open_low else '>='} {low}")
    raise ConfigError(field, value, f"must be a number in {'(' if open_low else '['}{low}, {high}]")


def choice(field: str, value: Any, allowed: tuple[str, ...] | Any) -> None:
    """``value`` must be one of ``allowed`` (a tuple, or a registry's keys)."""
    if value not in allowed:
        raise ConfigError(field, value, f"must be one of {', '.join(allowed)}")


def build(cls: type[T], section: str, values: dict[str, Any]) -> T:
    """``cls(**values)`` for the config dataclass ``cls`` of the settings section ``section``."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    coerced = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}", value,
                              f"is not a {section} setting; allowed: {', '.join(sorted(known))}")
        default = known[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{section}.{key}", value, "must be true or false")
        elif isinstance(default, float) and is_int(value):
            value = float(value)
        elif is_int(default) and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        coerced[key] = value
    return cls(**coerced)
