"""``virtual_width``: does reaching more expert slots across depth help, at matched active parameters?

The main space. Three architectures, each an explicit family of points on the same physical pool
``P = L * E`` (``E`` experts per layer, the dial that varies virtual width):

- ``layerwise`` — ordinary MoE: ``w = E, s = E`` (private experts), router ``softmax``, balance
  ``switch`` (per layer). Virtual width ``V = L * E``.
- ``unipool`` — UniPool-style global pool: ``w = P, s = 0``, router ``norm``, balance ``pool``.
  ``V = L * P``.
- ``moue`` — MoUE-style rotational pool: ``w = moue_window * E`` (capped at ``P - 1``), stride
  from ``moue_overlap`` (``s = round(w * (1 - overlap))``, raised if needed until every expert is
  reachable, always ``0 < s < w``), router ``trajectory``, balance ``exposure``, window layout
  ``moue_layout`` (``ring`` by default, or ``clamped``). ``V = L * w``.

The ablation families (issue 12) share the ``moue`` topology and change one component at a time
from the plain rotational pool, so a study can attribute a difference to one mechanism:

- ``rotational`` — the rotational windows alone: router ``softmax``, balance ``switch``, ``ring``;
- ``rotational_clamped`` — ``rotational`` with non-wrapping (``clamped``) windows;
- ``rotational_trajectory`` — ``rotational`` with the ``trajectory`` router;
- ``rotational_exposure`` — ``rotational`` with the ``exposure`` balance loss.

``moue`` with ``moue_layout = "clamped"`` is then the full recipe (all three components).

Held fixed: everything the study fixes. Varied: the family, ``E``, and optionally ``top_k``,
``n_layers`` and ``d_models`` (empty lists keep the study's values). A point at another width
``d`` scales the study's ``expert_hidden`` (and the MoUE-style router state) by ``d / d_study``
(to a multiple of 4), so the experts keep their shape relative to the model: width is the second
size axis of a scaling study.

Matching (``match``):

- ``"active"`` (default): every point is iso-active with the *matched MoE*, the layerwise point of
  the same depth and ``E`` at the study's ``top_k`` and ``expert_hidden``. ``expert_hidden`` is
  re-derived per point with ``match_expert_hidden`` so that the whole active count (attention,
  router rows of the window, the trajectory router's state, ``k`` experts) is within
  ``active_tol`` of the matched MoE's; changing ``k`` therefore keeps ``k * f`` about constant, and
  a router's extra active parameters are paid for by slightly smaller experts. A point that cannot
  be matched within the tolerance (``f`` moves in steps of 4) is pruned with the mismatch.
- ``"router_state"``: the same target, but a point with the ``trajectory`` router keeps the expert
  width of the matched MoE (``f`` as ``"active"`` would give it without the router's state) and pays
  for its state with the state size ``d_r`` instead: the largest ``d_r`` within ``active_tol`` above
  the target (``match_router_state``; pruned when even ``d_r = 1`` is over). At ``d = 64, E = 4``
  the experts alone already meet the target, so the state gets only the tolerance (``d_r = 12`` at
  5%, against 16 with ``f`` 56 under ``"active"``). The other routers have no state and are matched
  as under ``"active"``. Beside ``"active"`` (narrower experts, same
  ``d_r``) this separates "the router helps" from "narrower experts hurt": both keep the active
  count, and ``--dry-run`` prints both the active and the stored (total) count of every point.
- ``"none"``: docs/MODEL.md's looser iso-active (same ``d, L`` and ``k * f``: ``f = f0 * k0 / k``);
  the routers' differences in active parameters are left in and reported by the counts.

Depth is *not* matched: a point at another ``n_layers`` keeps ``d`` and is matched to the
layerwise MoE of its own depth, so its active count differs honestly from other depths'. That
gives a law both an ``N_active`` axis (depth) and a virtual-width axis (family and ``E``) at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import product
from typing import Any

from moue.errors import ConfigError
from moue.search_spaces._common import half_up, layerwise_topology, listed, multiple_of_4
from moue.search_spaces._space import Candidate, Space
from moue.search_spaces.constraints import model_value, reaching_stride
from moue.search_spaces.matching import active_params, match_expert_hidden, match_router_state

__all__ = ["SPACE", "FAMILIES", "build"]

FAMILIES = ("layerwise", "unipool", "moue", "rotational", "rotational_clamped", "rotational_trajectory",
            "rotational_exposure")
_ROUTING = {  # family -> (router, balance, window layout); None: the layout of space.moue_layout
    "layerwise": ("softmax", "switch", "ring"),
    "unipool": ("norm", "pool", "ring"),
    "moue": ("trajectory", "exposure", None),
    "rotational": ("softmax", "switch", "ring"),
    "rotational_clamped": ("softmax", "switch", "clamped"),
    "rotational_trajectory": ("trajectory", "switch", "ring"),
    "rotational_exposure": ("softmax", "exposure", "ring"),
}


def _topology(family: str, L: int, E: int, opts: dict[str, Any], group: int, layout: str) -> Candidate:
    P = L * E
    if family == "layerwise":
        return layerwise_topology(L, E), None
    if family == "unipool":
        return {"model.pool_size": P, "model.window": P, "model.stride": 0}, None
    w = min(opts["moue_window"] * E, P - 1)
    if L < 2 or w < 2:
        return None, f"{family} family: a rotational pool needs n_layers >= 2 and window >= 2 (L={L}, E={E})"
    s = min(max(half_up(w * (1 - opts["moue_overlap"])), 1), w - 1)
    s = reaching_stride(n_layers=L, pool_size=P, window=w, stride=s, group=group, layout=layout)
    if s is None or s >= w:
        return None, f"{family} family: no stride in (0, {w}) reaches all {P} experts with windows of {w} over {L} layers"
    return {"model.pool_size": P, "model.window": w, "model.stride": s}, None


def _check_widths(fixed: Mapping[str, Any], opts: dict[str, Any]) -> None:
    """Every listed width must split into the study's heads with an even head size (RoPE): checked
    for the whole list at once, so a define-by-run study fails at load time (its preview samples a
    few points) instead of when a sampler first suggests the bad width."""
    heads = model_value(fixed, "n_heads")
    for d in opts["d_models"]:
        if d % heads or (d // heads) % 2:
            raise ConfigError("space.d_models", d, f"must split into the study's model.n_heads ({heads}) "
                                                  "heads of an even size (RoPE)")


def _at_width(fixed: Mapping[str, Any], opts: dict[str, Any], d_model: int | None) -> tuple[dict, dict]:
    """The study's settings at width ``d_model``: (settings the point must carry, the fixed settings
    as seen at that width). ``None`` or the study's own width changes nothing."""
    d0 = model_value(fixed, "d_model")
    if d_model is None or d_model == d0:
        return {}, dict(fixed)
    scale = d_model / d0
    extra = {"model.d_model": d_model,
             "model.expert_hidden": multiple_of_4(model_value(fixed, "expert_hidden") * scale)}
    state = opts["router_state_dim"] or model_value(fixed, "router_state_dim")
    extra["model.router_state_dim"] = max(1, half_up(state * scale))
    return extra, {**fixed, **extra}


def build(fixed: Mapping[str, Any], opts: dict[str, Any], *, family: str, E: int, top_k: int,
          n_layers: int, d_model: int | None = None) -> Candidate:
    """One point of the space (also used by the tests and the runner's dry run to explain it)."""
    width, fixed = _at_width(fixed, opts, d_model)
    group = model_value(fixed, "group")
    router, balance, layout = _ROUTING[family]
    layout = layout or opts["moue_layout"]
    topo, reason = _topology(family, n_layers, E, opts, group, layout)
    if topo is None:
        return None, reason
    point = {**({"model.d_model": width["model.d_model"]} if width else {}),
             "model.n_layers": n_layers, "model.top_k": top_k, **topo,
             "model.router": router, "model.balance": balance}
    if layout != model_value(fixed, "window_layout"):
        point["model.window_layout"] = layout
    if group != 1:
        point["model.group"] = 1
    if router == "trajectory" and (opts["router_state_dim"] or width):
        point["model.router_state_dim"] = model_value(fixed, "router_state_dim") if width else opts["router_state_dim"]
    k0, f0 = model_value(fixed, "top_k"), model_value(fixed, "expert_hidden")
    if opts["match"] == "none":
        point["model.expert_hidden"] = multiple_of_4(f0 * k0 / top_k)
        return point, None
    if width:  # the matched MoE and the search below start from the scaled expert width
        point["model.expert_hidden"] = f0
    # the matched MoE: layerwise, same depth and E (at least k0 experts), the study's k and f
    e_ref = max(E, k0)
    matched = {**fixed, **point, **layerwise_topology(n_layers, e_ref), "model.router": "softmax",
               "model.top_k": k0, "model.expert_hidden": f0}
    if group != 1:
        matched["model.group"] = 1
    if top_k > point["model.window"]:
        return point, None  # impossible anyway; check_point names the constraint
    try:
        target = active_params(matched)
        if opts["match"] == "router_state" and router == "trajectory":
            # keep the expert width the point would have without the router's state; pay with d_r
            stateless = {**fixed, **point, "model.router": "softmax"}
            point["model.expert_hidden"] = match_expert_hidden(stateless, target)
            budget = int(target * (1 + opts["active_tol"]))  # the state gets what the tolerance leaves
            point["model.router_state_dim"] = match_router_state({**fixed, **point}, budget)
        else:
            point["model.expert_hidden"] = match_expert_hidden({**fixed, **point}, target)
        got = active_params({**fixed, **point})
    except ConfigError as err:  # the study's own settings cannot make this model: prune, saying why
        return point, str(err)
    if abs(got - target) > opts["active_tol"] * target:
        return point, (f"active parameters {got} differ from the matched layerwise MoE's {target} by "
                       f"{100 * (got - target) / target:+.1f}% (space.active_tol = {opts['active_tol']})")
    return point, None


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    _check_widths(fixed, opts)
    out = []
    for d, L, k, E, family in product(opts["d_models"] or [None], listed(opts["n_layers"], fixed, "n_layers"),
                                      listed(opts["top_k"], fixed, "top_k"), opts["experts_per_layer"],
                                      opts["families"]):
        out.append(build(fixed, opts, family=family, E=E, top_k=k, n_layers=L, d_model=d))
    return out


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    _check_widths(fixed, opts)
    family = trial.suggest_categorical("space.family", opts["families"])
    E = trial.suggest_categorical("space.experts_per_layer", opts["experts_per_layer"])
    k = trial.suggest_categorical("model.top_k", listed(opts["top_k"], fixed, "top_k"))
    L = trial.suggest_categorical("model.n_layers", listed(opts["n_layers"], fixed, "n_layers"))
    d = trial.suggest_categorical("space.d_model", opts["d_models"]) if opts["d_models"] else None
    return build(fixed, opts, family=family, E=E, top_k=k, n_layers=L, d_model=d)


SPACE = Space(
    name="virtual_width",
    description="layerwise vs UniPool-style vs MoUE-style pools over experts per layer (virtual width), "
                "top-k and depth, iso-active with the matched layerwise MoE",
    defaults={
        "families": list(FAMILIES[:3]),  # the three architectures; the ablation families on request
        "experts_per_layer": [2, 4, 8],
        "top_k": [],  # empty: the study's model.top_k
        "n_layers": [],  # empty: the study's model.n_layers
        "d_models": [],  # empty: the study's model.d_model; else widths (expert_hidden scaled with d)
        "moue_window": 2,  # rotational window, in experts per layer
        "moue_overlap": 0.5,  # fraction of a window shared with the next layer's
        "moue_layout": "ring",  # window layout of the moue family: ring (wraps) or clamped
        "match": "active",
        "active_tol": 0.02,
        "router_state_dim": 0,  # trajectory router state size for the moue family; 0: the study's
    },
    smoke={"experts_per_layer": [2], "router_state_dim": 8, "active_tol": 0.1},
    candidates=_candidates,
    define_fn=_define,
    choices={"families": FAMILIES, "match": ("active", "router_state", "none"), "moue_layout": ("ring", "clamped")},
    bounds={"experts_per_layer": (1, 1024), "top_k": (1, 1024), "n_layers": (1, 1024), "d_models": (4, 65536),
            "moue_window": (2, 1024), "moue_overlap": (0.0, 0.95), "active_tol": (0.0, 1.0),
            "router_state_dim": (0, 65536)},
    item_types={"top_k": int, "n_layers": int, "d_models": int},
)
