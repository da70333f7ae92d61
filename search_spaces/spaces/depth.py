"""``depth``: depth at fixed width, where a shared pool turns depth into virtual width.

Each point sets ``n_layers``; ``d, k, f`` and everything else stay the study's. Two families:

- ``shared`` — the study's pool, window and stride (router and balance too): the physical pool is
  fixed while virtual width ``L * w`` grows with depth (MoUE's "depth-width transformation").
  A depth too shallow for the study's stride to reach every expert gets the smallest stride that
  does (``repair_stride``; otherwise such points are pruned), recorded in the point.
- ``layerwise`` — ``E`` private experts per layer (``P = L*E, w = E, s = E``, router ``softmax``,
  balance ``switch``): physical and virtual width grow together. ``E`` is ``experts_per_layer``,
  or the study's window when 0.

Not matched: active parameters grow with depth (attention and ``k`` experts per layer), and the
counts report it; compare families at equal depth, which is iso-active in docs/MODEL.md's sense.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import product
from typing import Any

from moue.search_spaces._common import layerwise_topology
from moue.search_spaces._space import Candidate, Space
from moue.search_spaces.constraints import model_value, reaching_stride

__all__ = ["SPACE"]


def _point(fixed: Mapping[str, Any], opts: dict[str, Any], family: str, L: int) -> Candidate:
    if family == "layerwise":
        E = opts["experts_per_layer"] or model_value(fixed, "window")
        point = {"model.n_layers": L, **layerwise_topology(L, E), "model.router": "softmax",
                 "model.balance": "switch"}
        if model_value(fixed, "group") != 1:
            point["model.group"] = 1
        return point, None
    point = {"model.n_layers": L}
    if opts["repair_stride"]:
        P, w, s = (model_value(fixed, n) for n in ("pool_size", "window", "stride"))
        if w <= P and s < P:  # otherwise the study's own topology is invalid; check_point says so
            reached = reaching_stride(n_layers=L, pool_size=P, window=w, stride=s, group=model_value(fixed, "group"))
            if reached is None:
                return None, f"n_layers {L}: no stride reaches all {P} experts with windows of {w}"
            if reached != s:
                point["model.stride"] = reached
    return point, None


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    return [_point(fixed, opts, family, L) for L, family in product(opts["n_layers"], opts["families"])]


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    L = trial.suggest_categorical("model.n_layers", opts["n_layers"])
    family = trial.suggest_categorical("space.family", opts["families"])
    return _point(fixed, opts, family, L)


SPACE = Space(
    name="depth",
    description="n_layers at fixed d: a shared pool (virtual width grows, physical fixed) "
                "vs layerwise experts (both grow); active parameters grow with depth",
    defaults={
        "n_layers": [2, 4, 6, 8],
        "families": ["shared", "layerwise"],
        "experts_per_layer": 0,  # layerwise E; 0: the study's model.window
        "repair_stride": True,
    },
    smoke={"n_layers": [2, 3]},
    candidates=_candidates,
    define_fn=_define,
    choices={"families": ("shared", "layerwise")},
    bounds={"n_layers": (1, 1024), "experts_per_layer": (0, 1024)},
)
