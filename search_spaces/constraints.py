"""Which points are possible: ``check_point`` and ``prune``, before anything is launched.

A point is a dict of flat dotted overrides (``{"model.pool_size": 32, "model.window": 8}``) applied
on top of a study's fixed settings. ``check_point(flat)`` takes the merged dict and returns ``None``
or one line saying why it cannot run: whatever ``TrialConfig`` rejects (its model, training, data
and conversion sections and the rules between them: ``top_k <= window <= pool_size``, context no
longer than the RoPE table, a budget of at least one step, widening with a window to widen; see
``moue.config`` and ``moue.trial_config``), with one rule of its own: search spaces
reject an expert no layer can reach (a dead expert skews every parameter-matched comparison).

Nothing here restates a rule or copies a default: the configs are pure Python and validate
themselves; defaults are read from their dataclass fields.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from moue.config import ModelConfig
from moue.errors import ConfigError
from moue.topology import Topology
from moue.trial_config import ROUTER_INITS, SECTIONS, TrainConfig, TrialConfig

__all__ = ["check_point", "prune", "model_config", "model_value", "train_defaults", "train_value",
           "reaching_stride", "SECTIONS", "CONVERT_OPTIONS"]

CONVERT_OPTIONS = {"router_init": ROUTER_INITS}
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def train_defaults() -> dict[str, Any]:
    """``TrainConfig``'s field defaults."""
    return dict(_TRAIN_DEFAULTS)


def model_value(flat: Mapping[str, Any], name: str) -> Any:
    """``model.<name>`` from ``flat``, else ``ModelConfig``'s default."""
    return flat.get(f"model.{name}", _MODEL_DEFAULTS[name])


def train_value(flat: Mapping[str, Any], name: str) -> Any:
    """``train.<name>`` from ``flat``, else ``TrainConfig``'s default."""
    return flat.get(f"train.{name}", _TRAIN_DEFAULTS[name])


def model_config(flat: Mapping[str, Any], *, require_reachable: bool | None = None) -> ModelConfig:
    """``ModelConfig.from_dict`` of the ``model.*`` keys of ``flat`` (raises ``ConfigError``).

    ``require_reachable=None`` keeps the config's own setting, and then an unreachable expert only
    warns; ``True`` makes it an error; ``False`` builds quietly (counting only; validity is
    ``check_point``'s job)."""
    values = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    if require_reachable:
        values["require_reachable"] = True
    if require_reachable is False:
        with warnings.catch_warnings():  # the unreachable-expert warning, for a count only
            warnings.simplefilter("ignore", UserWarning)
            return ModelConfig.from_dict(values)
    return ModelConfig.from_dict(values)


def check_point(flat: Mapping[str, Any]) -> str | None:
    """``None`` if the merged settings ``flat`` (fixed + point) can run, else one line saying why."""
    try:
        TrialConfig.from_dict({**flat, "model.require_reachable": True})
    except ConfigError as err:
        return str(err)
    return None


def prune(points: Iterable[Mapping[str, Any]], fixed: Mapping[str, Any]
          ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Split ``points`` into those that can run on top of ``fixed`` and ``(point, reason)`` pairs."""
    kept: list[dict[str, Any]] = []
    pruned: list[tuple[dict[str, Any], str]] = []
    for point in points:
        reason = check_point({**fixed, **point})
        if reason:
            pruned.append((dict(point), reason))
        else:
            kept.append(dict(point))
    return kept, pruned


def reaching_stride(*, n_layers: int, pool_size: int, window: int, stride: int, group: int = 1,
                    layout: str = "ring") -> int | None:
    """The smallest stride ``>= stride`` (and ``< pool_size``) with every expert in some window.

    ``stride`` itself when it already reaches them all; ``None`` when none does (``L*w < P``).
    Used where a derived topology would otherwise leave dead experts (shallow depth, a sampled
    overlap); the point carries the stride actually used, so counts stay honest."""
    if window >= pool_size:
        return stride
    for s in range(max(stride, 1), pool_size):
        topo = Topology(n_layers=n_layers, pool_size=pool_size, window=window, stride=s, group=group, layout=layout)
        if topo.unreachable == 0:
            return s
    return None
