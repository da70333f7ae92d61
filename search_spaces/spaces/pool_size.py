"""``pool_size``: how small can a shared pool be? UniPool's reduced-pool experiment.

UniPool (docs/MODEL.md section 8) found that a global pool holding only 66.7%, 50% or 41.6% of the
layerwise expert budget ``L * E`` still beat the layerwise MoE. Points: a UniPool-style pool
(``w = P, s = 0``, router ``norm``, balance ``pool``) with ``P = round(fraction * L * E)`` for each
fraction and each ``E``, plus (``include_layerwise``) the layerwise MoE at the full budget as the
baseline (``P = L*E, w = E, s = E``, router ``softmax``, balance ``switch``).

Held fixed: ``d, L, k, f`` (iso-active in docs/MODEL.md's sense; the router's window rows ``w * d`` per
layer are the only active difference and are reported by the counts). Varied: total parameters,
through ``P``. Define-by-run samples the fraction continuously in ``[min(fractions), 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moue.search_spaces._common import half_up, layerwise_topology
from moue.search_spaces._space import Candidate, Space
from moue.search_spaces.constraints import model_value

__all__ = ["SPACE"]


def _unipool(fixed: Mapping[str, Any], E: int, fraction: float) -> Candidate:
    L = model_value(fixed, "n_layers")
    P = max(half_up(fraction * L * E), model_value(fixed, "top_k"))
    point = {"model.pool_size": P, "model.window": P, "model.stride": 0, "model.router": "norm",
             "model.balance": "pool"}
    return point, None


def _layerwise(fixed: Mapping[str, Any], E: int) -> Candidate:
    point = {**layerwise_topology(model_value(fixed, "n_layers"), E), "model.router": "softmax",
             "model.balance": "switch"}
    return point, None


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    out = []
    for E in opts["experts_per_layer"]:
        if opts["include_layerwise"]:
            out.append(_layerwise(fixed, E))
        out.extend(_unipool(fixed, E, frac) for frac in opts["fractions"])
    return out


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    E = trial.suggest_categorical("space.experts_per_layer", opts["experts_per_layer"])
    family = "unipool"
    if opts["include_layerwise"]:
        family = trial.suggest_categorical("space.family", ["layerwise", "unipool"])
    low = min(opts["fractions"])
    frac = trial.suggest_float("space.pool_fraction", low, 1.0) if low < 1.0 else 1.0
    return _layerwise(fixed, E) if family == "layerwise" else _unipool(fixed, E, frac)


SPACE = Space(
    name="pool_size",
    description="UniPool-style reduced pools: P as a fraction of the layerwise budget L*E, "
                "with the layerwise MoE as baseline (iso-active, total varies)",
    defaults={
        "experts_per_layer": [4, 8],
        "fractions": [1.0, 0.667, 0.5, 0.417],
        "include_layerwise": True,
    },
    smoke={"experts_per_layer": [2], "fractions": [1.0, 0.5]},
    candidates=_candidates,
    define_fn=_define,
    bounds={"experts_per_layer": (1, 1024), "fractions": (0.01, 1.0)},
)
