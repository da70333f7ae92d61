"""``router_balance``: router x balance loss on a shared pool, a small replica of UniPool's ablation.

UniPool (docs/MODEL.md section 3) found that sharing a pool with a *per-layer* balance loss was worse
than the layerwise MoE, sharing with the *pool* loss better, and the NormRouter better still. This
space crosses ``router`` in {softmax, norm, trajectory} with ``balance`` in {switch (per layer),
pool, exposure, none} on one shared pool, plus (``include_layerwise``) the layerwise MoE baseline
(``P = L*E, w = E, s = E``, softmax, switch) with ``E = P // L`` experts per layer by default, so
its experts hold the same parameters as the shared pool's.

The shared pool is the study's topology (``topology = "study"``; with a rotational window every
balance loss differs), or UniPool's global pool over the study's pool size (``"unipool"``:
``w = P, s = 0``; there ``exposure`` coincides with ``pool`` since every expert is seen by every
layer). Held fixed: ``d, L, k, f`` and the pool. Active parameters differ only by the routers'
own parameters (the trajectory router's state is the big one), reported by the counts.
Define-by-run samples router and balance on the shared pool only (no baseline).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import product
from typing import Any

from moue.config import BALANCES, ROUTERS
from moue.search_spaces._common import layerwise_topology
from moue.search_spaces._space import Candidate, Space
from moue.search_spaces.constraints import model_value

__all__ = ["SPACE"]


def _shared(fixed: Mapping[str, Any], opts: dict[str, Any], router: str, balance: str) -> Candidate:
    point: dict[str, Any] = {}
    if opts["topology"] == "unipool":
        P = model_value(fixed, "pool_size")
        point.update({"model.pool_size": P, "model.window": P, "model.stride": 0})
    point.update({"model.router": router, "model.balance": balance})
    return point, None


def _layerwise(fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    L = model_value(fixed, "n_layers")
    E = opts["experts_per_layer"] or max(1, model_value(fixed, "pool_size") // L)
    point = {**layerwise_topology(L, E), "model.router": "softmax", "model.balance": "switch"}
    if model_value(fixed, "group") != 1:
        point["model.group"] = 1
    return point, None


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    out = [_layerwise(fixed, opts)] if opts["include_layerwise"] else []
    out += [_shared(fixed, opts, r, b) for r, b in product(opts["routers"], opts["balances"])]
    return out


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    router = trial.suggest_categorical("model.router", opts["routers"])
    balance = trial.suggest_categorical("model.balance", opts["balances"])
    return _shared(fixed, opts, router, balance)


SPACE = Space(
    name="router_balance",
    description="router {softmax, norm, trajectory} x balance {switch, pool, exposure, none} on a shared "
                "pool, with the layerwise MoE as baseline (UniPool's ablation, small)",
    defaults={
        "routers": list(ROUTERS),
        "balances": list(BALANCES),
        "topology": "study",
        "include_layerwise": True,
        "experts_per_layer": 0,  # layerwise baseline's E; 0: pool_size // n_layers (same expert parameters)
    },
    smoke={"routers": ["softmax", "trajectory"], "balances": ["pool"]},
    candidates=_candidates,
    define_fn=_define,
    choices={"routers": ROUTERS, "balances": BALANCES, "topology": ("study", "unipool")},
    bounds={"experts_per_layer": (0, 1024)},
)
