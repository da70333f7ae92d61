"""Matched comparisons (docs/MODEL.md section 6): iso-active and iso-total helpers, from honest counts.

Every number comes from ``moue.counting.count`` (pure Python), so a helper and the logged
``derived.*`` params can never disagree. Counts exclude embeddings (counting's convention).

- ``match_expert_hidden(flat, target_active)``: the expert hidden size ``f`` (a multiple of 4, the
  grouped_mm constraint of docs/MODEL.md section 5) whose active count is closest to the target. Active
  parameters are linear in ``f`` (``L * (k + n_s) * 3 * d * f`` plus what does not depend on ``f``),
  so two counts give the line and the nearest multiples of 4 are compared exactly. Changing ``k``
  at a matched target keeps ``k * f`` about constant (the router's rows are the small remainder).
- ``match_router_state(flat, max_active)``: the largest state size ``d_r`` of the trajectory router
  whose active count stays within ``max_active``, the expert width held. The count is quadratic in
  ``d_r`` (the GRU's ``6 d_r^2`` per layer), so it is searched (monotone, bisection).
- ``match_pool_size(flat, target_total)``: the pool size ``P`` whose total count is closest to the
  target, the window held (or, for a UniPool-style ``w = P``, kept equal to ``P``). Total
  parameters are linear in ``P`` for a fixed window rule, so the same two-count method applies.

Both return the best value without judging it: ``check_point`` says whether the result can run,
and a space decides whether the remaining mismatch is within its tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moue.counting import Counts, count
from moue.errors import ConfigError
from moue.search_spaces.constraints import model_config, model_value

__all__ = ["counts", "active_params", "total_params", "virtual_width", "match_expert_hidden",
           "match_router_state", "match_pool_size", "topology_family"]


def counts(flat: Mapping[str, Any]) -> Counts:
    """``count(ModelConfig)`` of the ``model.*`` keys of ``flat`` (raises ``ConfigError`` if invalid)."""
    return count(model_config(flat, require_reachable=False))


def active_params(flat: Mapping[str, Any]) -> int:
    """Non-embedding parameters one token uses (``n_params_active``)."""
    return counts(flat).n_params_active


def total_params(flat: Mapping[str, Any]) -> int:
    """Stored non-embedding parameters (``n_params_total``)."""
    return counts(flat).n_params_total


def virtual_width(flat: Mapping[str, Any]) -> int:
    """``V = L * w``: expert slots a token can reach across depth (0 for a dense FFN)."""
    return counts(flat).virtual_width


def _nearest(candidates: list[int], value_of, target: int) -> int:
    """The candidate whose value is closest to ``target`` (ties: the smaller candidate)."""
    return min(sorted(set(candidates)), key=lambda c: abs(value_of(c) - target))


def match_expert_hidden(flat: Mapping[str, Any], target_active: int) -> int:
    """The multiple-of-4 ``model.expert_hidden`` (>= 4) whose active count is closest to ``target_active``."""
    def active(f: int) -> int:
        return active_params({**flat, "model.expert_hidden": f})

    a4 = active(4)
    slope = (active(8) - a4) / 4  # 3 * d * L * (k + n_s) parameters per unit of f
    if slope <= 0:
        raise ConfigError("model.ffn", model_value(flat, "ffn"), "must be moe to match expert_hidden")
    ideal = 4 + (target_active - a4) / slope
    low = max(4, 4 * math.floor(ideal / 4))
    return _nearest([low, low + 4], active, target_active)


def match_router_state(flat: Mapping[str, Any], max_active: int) -> int:
    """The largest ``model.router_state_dim`` whose active count is at most ``max_active``.

    Raises ``ConfigError`` when even ``d_r = 1`` exceeds it (the held expert width leaves no room)."""
    if model_value(flat, "router") != "trajectory":
        raise ConfigError("model.router", model_value(flat, "router"), "must be trajectory to match router_state_dim")

    def active(r: int) -> int:
        return active_params({**flat, "model.router_state_dim": r})

    if active(1) > max_active:
        raise ConfigError("model.router_state_dim", 1, f"leaves {active(1)} active parameters, over the "
                          f"budget of {max_active} at model.expert_hidden = {model_value(flat, 'expert_hidden')}")
    lo, hi = 1, 4 * model_value(flat, "d_model")  # active(r) grows with r
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if active(mid) <= max_active:
            lo = mid
        else:
            hi = mid - 1
    return lo


def match_pool_size(flat: Mapping[str, Any], target_total: int) -> int:
    """The ``model.pool_size`` whose total count is closest to ``target_total``.

    The window is held, except for a UniPool-style pool (``window == pool_size``), whose window
    follows the pool. The result is at least ``max(window, stride + 1)`` (``top_k`` for UniPool)."""
    unipool = model_value(flat, "window") == model_value(flat, "pool_size")
    window, stride = model_value(flat, "window"), model_value(flat, "stride")

    def at(p: int) -> dict[str, Any]:
        return {**flat, "model.pool_size": p, "model.window": p if unipool else window}

    def total(p: int) -> int:
        return total_params(at(p))

    floor_p = max(model_value(flat, "top_k"), stride + 1) if unipool else max(window, stride + 1)
    t0 = total(floor_p)
    slope = total(floor_p + 1) - t0  # one expert (3 * d * f) plus its router rows where stored per expert
    ideal = floor_p + (target_total - t0) / slope
    low = max(floor_p, math.floor(ideal))
    return _nearest([low, low + 1], total, target_total)


def topology_family(flat: Mapping[str, Any]) -> str:
    """Which of docs/MODEL.md's architectures the topology of ``flat`` is (router and balance aside):

    ``layerwise`` (``P = L*w, s = w, g = 1``), ``unipool`` (``w = P, s = 0``), ``moue`` (rotational:
    ``w < P, 0 < s < w``) or ``other`` (e.g. tiling windows on a pool that is not ``L*w``)."""
    L, P = model_value(flat, "n_layers"), model_value(flat, "pool_size")
    w, s, g = model_value(flat, "window"), model_value(flat, "stride"), model_value(flat, "group")
    if P == L * w and s == w % P and g == 1:
        return "layerwise"
    if w == P and s == 0:
        return "unipool"
    if w < P and 0 < s < w:
        return "moue"
    return "other"
