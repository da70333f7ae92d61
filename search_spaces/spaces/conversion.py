"""``conversion``: widen the windows of a converted layerwise MoE checkpoint (docs/MODEL.md section 7).

MoUE reports its largest gain (up to 4.2%) from converting an existing MoE and training on. A
layerwise MoE with ``E`` experts per layer is placed on the ring in layer order (``P = L*E``,
``s = E``); at ``w = E`` it computes exactly what the original did. Each point trains on from that
checkpoint with a target window ``w = m * E`` (``m`` in ``window_multiples``, at most ``P``),
widened linearly over ``train.widen_tokens = widen_fraction * train.tokens``, router rows of newly
visible experts starting at zero or copied from their owner's router (``convert.router_init``).
``m = 1`` is the control: the same checkpoint trained on unchanged (no widening). The grid prunes
a window wider than the pool; define-by-run caps it at ``P`` instead (every sample runs).

Points carry ``model.pool_size``, ``model.window`` (the target), ``model.stride``, ``model.router``
(``softmax``, the converted router), ``train.widen_tokens`` and ``convert.router_init``. The
runner supplies the checkpoint (``train.init_from``) of the layerwise base, which is
``layerwise_base(point)``: the same settings with ``w = s = E`` (``E`` = the point's stride).

Held fixed: ``d, L, k, f``, the token budget and the base's experts; active parameters grow only by
the router rows of the wider window.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import product
from typing import Any

from moue.search_spaces._common import half_up, layerwise_topology
from moue.search_spaces._space import Candidate, Space
from moue.search_spaces.constraints import CONVERT_OPTIONS, model_value, train_value

__all__ = ["SPACE", "layerwise_base"]


def layerwise_base(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The model overrides of the layerwise MoE a conversion point starts from (``w = s = E``)."""
    E = model_value(flat, "stride")
    return {**layerwise_topology(model_value(flat, "n_layers"), E), "model.router": "softmax"}


def _point(fixed: Mapping[str, Any], opts: dict[str, Any], m: int, frac: float, init: str,
           *, clamp: bool = False) -> Candidate:
    L = model_value(fixed, "n_layers")
    E = opts["experts_per_layer"] or model_value(fixed, "window")
    topo = layerwise_topology(L, E)
    w = min(m * E, topo["model.pool_size"]) if clamp else m * E
    point = {**topo, "model.window": w, "model.router": "softmax",
             "train.widen_tokens": 0 if m == 1 else half_up(frac * train_value(fixed, "tokens")),
             "convert.router_init": init}
    if model_value(fixed, "group") != 1:
        point["model.group"] = 1
    if w > topo["model.pool_size"]:
        return point, f"target window {m} x {E} exceeds the pool of L*E = {topo['model.pool_size']} experts"
    return point, None


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    out = []
    for m in opts["window_multiples"]:
        if m == 1:  # the control: nothing widens, so neither the fraction nor the router init matters
            out.append(_point(fixed, opts, 1, 0.0, opts["router_inits"][0]))
            continue
        out += [_point(fixed, opts, m, frac, init)
                for frac, init in product(opts["widen_fractions"], opts["router_inits"])]
    return out


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    m = trial.suggest_categorical("space.window_multiple", opts["window_multiples"])
    low, high = min(opts["widen_fractions"]), max(opts["widen_fractions"])
    frac = trial.suggest_float("space.widen_fraction", low, high)
    init = trial.suggest_categorical("convert.router_init", opts["router_inits"])
    return _point(fixed, opts, m, frac, init, clamp=True)


SPACE = Space(
    name="conversion",
    description="layerwise MoE checkpoint -> windows of m*E experts, widened over a fraction of the "
                "budget, router rows zero or copied (m = 1: trained on unchanged)",
    defaults={
        "experts_per_layer": 0,  # E of the layerwise base; 0: the study's model.window
        "window_multiples": [1, 2, 4],
        "widen_fractions": [0.25, 0.5],
        "router_inits": list(CONVERT_OPTIONS["router_init"]),
    },
    smoke={"window_multiples": [1, 2], "widen_fractions": [0.5]},
    candidates=_candidates,
    define_fn=_define,
    choices={"router_inits": CONVERT_OPTIONS["router_init"]},
    bounds={"experts_per_layer": (0, 1024), "window_multiples": (1, 1024), "widen_fractions": (0.0, 1.0)},
)
