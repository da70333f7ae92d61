"""``rotation``: stride x window on a fixed pool (the Staggered Rotational Topology's two dials).

For the study's pool ``P`` (and depth, router, balance, everything else), each point sets the
window ``w = round(window_fraction * P)`` (at least ``top_k``) and the stride from the overlap of
consecutive windows, ``s = round(w * (1 - overlap))``: overlap 0 tiles the ring (``s = w``), larger
overlaps share more experts between neighbouring layers. ``w = P`` is the UniPool limit (``s = 0``).

Held fixed: ``P, d, L, k, f`` and the routing (iso-active in docs/MODEL.md's sense: only the router's
``w * d`` window rows per layer differ, reported by the counts; total parameters equal up to the
stored router rows). Varied: virtual width ``L * w``, reuse and exposure.

Grid points that leave experts unreachable (``L`` windows of ``w`` stepping ``s`` do not cover the
ring) are pruned with the reason. Define-by-run samples both fractions continuously and repairs
instead: the window is raised to ``ceil(P / L)`` and the stride to the smallest that reaches every
expert, so every sample runs; the point records the ``w`` and ``s`` actually used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import product
from typing import Any

from moue.search_spaces._common import half_up, stride_from_overlap
from moue.search_spaces._space import Candidate, Space
from moue.search_spaces.constraints import model_value, reaching_stride

__all__ = ["SPACE"]


def _point(fixed: Mapping[str, Any], window_fraction: float, overlap: float, *, repair: bool) -> Candidate:
    P, k = model_value(fixed, "pool_size"), model_value(fixed, "top_k")
    L, g = model_value(fixed, "n_layers"), model_value(fixed, "group")
    w = min(max(half_up(window_fraction * P), k, 1), P)
    if repair:
        w = max(w, math.ceil(P / math.ceil(L / g)))  # fewer distinct windows than that cannot cover P
    if w >= P:
        return {"model.window": P, "model.stride": 0}, None
    s = min(max(stride_from_overlap(w, overlap), 1), P - 1)
    if repair:
        s = reaching_stride(n_layers=L, pool_size=P, window=w, stride=s, group=g)
        if s is None:
            return None, f"no stride reaches all {P} experts with windows of {w} over {L} layers"
    return {"model.window": w, "model.stride": s}, None


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    return [_point(fixed, wf, ov, repair=False)
            for wf, ov in product(opts["window_fractions"], opts["overlaps"])]


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    wf = trial.suggest_float("space.window_fraction", min(opts["window_fractions"]), max(opts["window_fractions"]))
    ov = trial.suggest_float("space.overlap", min(opts["overlaps"]), max(opts["overlaps"]))
    return _point(fixed, wf, ov, repair=True)


SPACE = Space(
    name="rotation",
    description="stride x window of a rotational pool at the study's pool size "
                "(virtual width and reuse vary; d, L, k, f fixed)",
    defaults={
        "window_fractions": [0.25, 0.5, 0.75],
        "overlaps": [0.0, 0.25, 0.5, 0.75],
    },
    smoke={"window_fractions": [0.5, 0.75], "overlaps": [0.0, 0.5]},
    candidates=_candidates,
    define_fn=_define,
    bounds={"window_fractions": (0.0, 1.0), "overlaps": (0.0, 0.95)},
)
