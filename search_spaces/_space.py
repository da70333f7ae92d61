"""The ``Space`` record: a named search space with documented options, a grid and a define-by-run.

A space is declarative. Its two functions turn the study's fixed settings (flat dotted keys) and
the resolved options into points (flat dotted overrides); neither builds a model, imports torch or
does anything slow ("no actual computation inside a search space definition", Ray Tune).

- ``grid(fixed, options)``: explicit points for the ``grid`` algorithm, impossible ones removed;
  ``grid_pruned`` also returns what was removed and why (the dry run prints it).
- ``define(trial, fixed, options)``: Optuna define-by-run for ``tpe`` / ``random``. Every
  ``trial.suggest_*`` call uses the same name and the same distribution in every trial (TPE needs
  static distributions): a value whose valid range depends on an earlier suggestion is derived from
  a fraction or an index drawn from a fixed set. Suggestions that are not settings themselves (a
  family, a fraction) are named ``space.<name>``; ``define`` returns the complete point (the
  suggested settings and the derived ones), and never a ``space.*`` key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from moue.errors import ConfigError
from moue.fields import is_int
from moue.search_spaces.constraints import check_point

if TYPE_CHECKING:  # optuna is only a type here: search spaces never import it
    import optuna

__all__ = ["Space", "Candidate", "SEARCH_PREFIX"]

SEARCH_PREFIX = "space."  # Optuna parameter names of search coordinates that are not settings

Candidate = tuple[dict[str, Any] | None, str | None]  # (point, why it is pruned) from a space's builder


@dataclass(frozen=True, kw_only=True)
class Space:
    """A named search space (see the module docstring)."""

    name: str
    description: str  # one line, shown by ``moue studies`` and dry runs
    defaults: Mapping[str, Any]  # the options of a spec's [space] table, with their defaults
    smoke: Mapping[str, Any]  # option overrides for ``moue sweep --smoke`` (a few tiny points)
    candidates: Callable[[Mapping[str, Any], dict[str, Any]], list[Candidate]] = field(repr=False)
    define_fn: Callable[[Any, Mapping[str, Any], dict[str, Any]], Candidate] = field(repr=False)
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict, repr=False)  # allowed values
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict, repr=False)  # closed ranges
    item_types: Mapping[str, type] = field(default_factory=dict, repr=False)  # for empty default lists
    check: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)  # cross-option rules

    def __post_init__(self) -> None:
        for name in ("defaults", "smoke", "choices", "bounds", "item_types"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        self.options(self.smoke)  # a shipped smoke table must itself be valid

    # -- options -----------------------------------------------------------------------------

    def options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``defaults`` updated by ``given``; an unknown key or a bad value raises ``ConfigError``
        naming ``space.<key>``, the value and what is allowed."""
        resolved = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.defaults.items()}
        for key, value in given.items():
            if key not in self.defaults:
                raise ConfigError(f"space.{key}", value, f"is not an option of space '{self.name}'; "
                                  f"allowed: {', '.join(sorted(self.defaults))}")
            resolved[key] = self._coerce(key, value)
        if self.check is not None:
            self.check(resolved)
        return resolved

    def _coerce(self, key: str, value: Any) -> Any:
        default = self.defaults[key]
        if isinstance(default, (list, tuple)):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"space.{key}", value, f"must be a list, e.g. {list(default)!r}")
            if not value and default:
                raise ConfigError(f"space.{key}", value, "must not be empty")
            kind = self.item_types.get(key) or type(default[0])
            items = [self._scalar(key, v, kind, value) for v in value]
            return list(dict.fromkeys(items))  # repeated values would repeat grid points
        return self._scalar(key, value, type(default), value)

    def _scalar(self, key: str, v: Any, kind: type, shown: Any) -> Any:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        ok = {
            bool: isinstance(v, bool),
            int: is_int(v),
            float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            str: isinstance(v, str),
        }[kind]
        if not ok:
            raise ConfigError(f"space.{key}", shown, f"must be {names[kind]}"
                              + (" (or a list of them)" if isinstance(self.defaults[key], list) else ""))
        if kind is float:
            v = float(v)
        if key in self.choices and v not in self.choices[key]:
            raise ConfigError(f"space.{key}", shown,
                              f"must be one of {', '.join(map(str, self.choices[key]))}")
        if key in self.bounds:
            lo, hi = self.bounds[key]
            if not lo <= v <= hi:
                raise ConfigError(f"space.{key}", shown, f"must be in [{lo}, {hi}]")
        return v

    # -- points ------------------------------------------------------------------------------

    def grid_pruned(self, fixed: Mapping[str, Any], options: Mapping[str, Any]
                    ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
        """The grid and what was pruned from it, each pruned point with a one-line reason.

        Duplicates (two option combinations that derive the same point) are kept once, silently."""
        opts = self.options(options)
        kept: list[dict[str, Any]] = []
        pruned: list[tuple[dict[str, Any], str]] = []
        seen: set[tuple] = set()
        for point, reason in self.candidates(fixed, opts):
            point = point or {}
            signature = tuple(sorted((k, repr(v)) for k, v in point.items()))
            if signature in seen:
                continue
            seen.add(signature)
            reason = reason or check_point({**fixed, **point})
            if reason:
                pruned.append((point, reason))
            else:
                kept.append(point)
        return kept, pruned

    def grid(self, fixed: Mapping[str, Any], options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Explicit points for the ``grid`` algorithm; every one passes ``check_point``."""
        return self.grid_pruned(fixed, options)[0]

    def define(self, trial: optuna.Trial, fixed: Mapping[str, Any], options: Mapping[str, Any]
               ) -> dict[str, Any]:
        """Define-by-run: suggest on ``trial`` (static distributions) and return the whole point.

        A point that cannot be valid (an option combination no derivation can repair, e.g. a
        rotational pool at depth 1) raises ``ConfigError`` rather than launching a doomed trial."""
        opts = self.options(options)
        point, reason = self.define_fn(trial, fixed, opts)
        # a reason with a point is advisory (e.g. matched only to within the rounding of f): the
        # point is still a valid model, so the trial runs and its counts are logged honestly
        problem = check_point({**fixed, **point}) if point is not None else reason
        if problem:
            raise ConfigError(f"space.{self.name}", dict(trial.params),
                              f"suggested an impossible point: {problem}")
        return point
