"""``ladder``: a size ladder from one dial, every other setting derived in code (issue 13).

A study names one size dial and its values (``sizes``); each size of each family becomes a point
whose settings follow from it by the rules below (each with its source), so a ladder's sizes differ
in the way the scaling-law literature says they should and in no other way:

- ``dial = "d_model"``: the width is the size (depth stays the study's); ``"n_layers"``: the depth
  (width stays); ``"active_params"``: the width whose layerwise model at the study's depth has the
  active (non-embedding) count closest to the size.
- heads: ``n_heads = d_model / head_dim`` (a fixed head size, as OLMo-core's and most ladders).
- expert width: ``f = expert_ratio * d_model`` to a multiple of 4 (default: the study's ``f / d``);
  the trajectory router's state ``d_r = router_state_ratio * d_model``. The families' topologies
  and iso-active matching are ``virtual_width``'s (``build``), at each size.
- tokens per trial: ``D = tokens_per_param * N_active`` (Hoffmann et al. 2022: about 20 tokens per
  parameter is compute-optimal), whole batches, at least one; ``0`` keeps the study's budget.
- warm-up: ``warmup = "per_param"`` makes the warm-up ``N_active`` tokens (OLMo-core's ladder:
  one token per parameter), at most 20% of the run; ``"study"`` keeps the study's fraction.
- learning rate (``lr_rule``): ``"fixed"`` (the study's ``train.lr`` at every size; biased,
  Porian et al. 2024), ``"power"`` (``lr = train.lr * (N / N_ref)^-lr_exponent``, ``N_ref`` the
  smallest size's count unless ``lr_ref_params``), or the path of a rule fitted by ``moue
  lr-rule`` from an LR stage (``lr = c * N^-exponent``, the JSON it writes; a relative path is
  looked up next to the spec first).
- cooldown branches (``cooldowns``, fractions of each trial's tokens, for a ``wsd`` study): the
  trial's ``train.cooldown_at``, so every size gets extra D points at the same relative lengths.
- an IsoFLOP design (``isoflop_budgets``, training FLOPs, for a ``wsd`` study): each size trains
  to the largest budget it takes part in, and forks a cooldown branch that ends at each smaller
  one, so every budget gets a point from every size whose tokens per parameter at that budget,
  ``D = C / flops_per_token``, lie within ``isoflop_tpp`` (Hagele et al. 2024, section 4: IsoFLOP
  profiles from one WSD run per size). ``tokens_per_param`` is then a minimum (``0``: none).
  Hoffmann et al.'s Approach 2 needs several N per budget; the report fits it on the branches.
- the LR stage: ``lr_scan`` (multipliers, e.g. ``[0.25, 0.5, 1, 2, 4]``) runs every size at each
  multiple of its rule's LR, at ``lr_scan_tokens_per_param`` tokens per parameter (short); ``moue
  lr-rule`` then fits the optimum per size and the power law through them; ``lr_scan_only`` (active
  counts) keeps only those sizes (the stage's bracket extension, ``moue.studies.stages``).

``--dry-run`` prints every derived value of every point and the compute of each trial and of the
whole study.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from itertools import product
from pathlib import Path
from typing import Any

from moue.errors import ConfigError
from moue.search_spaces._common import half_up, multiple_of_4
from moue.search_spaces._space import Candidate, Space
from moue.counting import count
from moue.search_spaces.constraints import model_config, model_value, train_value
from moue.search_spaces.matching import active_params
from moue.search_spaces.spaces import virtual_width as vw

__all__ = ["SPACE", "lr_from_rule"]

_VW_OPTIONS = ("moue_window", "moue_overlap", "moue_layout", "match", "active_tol")


def lr_from_rule(path: str, n_active: int) -> float:
    """``c * N^-exponent`` of a rule file written by ``moue lr-rule``."""
    try:
        rule = json.loads(Path(path).read_text())
        return float(rule["c"]) * float(n_active) ** -float(rule["exponent"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("space.lr_rule", path, f"must be 'fixed', 'power' or a rule file of moue lr-rule "
                          f"({type(e).__name__})") from None


def _width_for(fixed: Mapping[str, Any], opts: dict[str, Any], target: float) -> int:
    """The width (a multiple of ``head_dim``) whose layerwise model has the active count closest to ``target``."""
    hd, E = opts["head_dim"], opts["experts_per_layer"]
    L = model_value(fixed, "n_layers")

    def active(d: int) -> int:
        f = multiple_of_4(_ratio(fixed, opts) * d)
        return active_params({**fixed, "model.d_model": d, "model.n_heads": d // hd, "model.expert_hidden": f,
                              "model.pool_size": L * E, "model.window": E, "model.stride": E % (L * E),
                              "model.router": "softmax"})

    return min(range(hd, 64 * hd + 1, hd), key=lambda d: abs(active(d) - target))


def _ratio(fixed: Mapping[str, Any], opts: dict[str, Any]) -> float:
    return opts["expert_ratio"] or model_value(fixed, "expert_hidden") / model_value(fixed, "d_model")


def _size_settings(fixed: Mapping[str, Any], opts: dict[str, Any], size: float) -> dict[str, Any]:
    """The trunk settings of one size (heads, width or depth, expert width, router state)."""
    d, L = model_value(fixed, "d_model"), model_value(fixed, "n_layers")
    if opts["dial"] == "d_model":
        d = int(size)
    elif opts["dial"] == "n_layers":
        L = int(size)
    else:
        d = _width_for(fixed, opts, size)
    if d % opts["head_dim"]:
        raise ConfigError("space.sizes", size, f"gives d_model {d}, not a multiple of space.head_dim ({opts['head_dim']})")
    return {"model.d_model": d, "model.n_layers": L, "model.n_heads": d // opts["head_dim"],
            "model.expert_hidden": multiple_of_4(_ratio(fixed, opts) * d),
            "model.router_state_dim": max(1, half_up(opts["router_state_ratio"] * d))}


def _train_settings(fixed, opts, n_active: int, n_ref: int, multiplier: float, scan: bool,
                    flops_per_token: int = 0) -> dict[str, Any]:
    batch = train_value(fixed, "batch_tokens")
    per_param = opts["lr_scan_tokens_per_param"] if scan else opts["tokens_per_param"]
    out: dict[str, Any] = {}
    tokens = train_value(fixed, "tokens")
    if per_param:
        tokens = max(batch, half_up(per_param * n_active / batch) * batch)
        out["train.tokens"] = tokens
    at: set[int] = set()
    if opts["isoflop_budgets"] and not scan:
        tokens, at = _isoflop_tokens(fixed, opts, n_active, flops_per_token, tokens if per_param else 0)
        out["train.tokens"] = tokens
    if opts["cooldowns"] and not scan:  # branch points as fractions of this trial's tokens (wsd)
        at |= {max(1, half_up(f * tokens / batch)) * batch for f in opts["cooldowns"]}
    if at:
        out["train.cooldown_at"] = sorted(at)
    if opts["warmup"] == "per_param":
        out["train.warmup_frac"] = round(min(0.2, n_active / tokens), 4)
    rule, lr = opts["lr_rule"], train_value(fixed, "lr")
    if rule == "power":
        lr = lr * (n_active / (opts["lr_ref_params"] or n_ref)) ** -opts["lr_exponent"]
    elif rule != "fixed":
        lr = lr_from_rule(rule, n_active)
    out["train.lr"] = float(f"{lr * multiplier:.4g}")
    return out


def isoflop_tokens(budgets, flops_per_token: int, n_active: int, tpp: tuple[float, float]) -> list[float]:
    """The token counts at which a model of ``flops_per_token`` reaches each budget whose tokens
    per parameter lie within ``tpp`` (unrounded, ascending)."""
    lo, hi = tpp
    d = sorted(c / flops_per_token for c in budgets)
    return [t for t in d if lo <= t / n_active <= hi]


def _isoflop_tokens(fixed, opts, n_active: int, flops_per_token: int, minimum: int) -> tuple[int, set[int]]:
    """A trial's tokens (its largest budget's, at least ``minimum``) and the fork points of the
    branches that end at its other budgets: a branch forked after ``s`` steps decays over
    ``round(cooldown_frac * s)`` more (``Trainer``), so ``s`` is the step count whose branch ends
    nearest the budget's tokens."""
    batch, frac = train_value(fixed, "batch_tokens"), train_value(fixed, "cooldown_frac")
    decay = train_value(fixed, "decay_frac")
    targets = [half_up(t / batch) for t in isoflop_tokens(opts["isoflop_budgets"], flops_per_token, n_active,
                                                        tuple(opts["isoflop_tpp"]))]
    steps = max([*targets, half_up(minimum / batch), 1])
    at = set()
    for target in targets:
        if target >= steps:
            continue  # the trial's own final point
        guess = int(target / (1 + frac))
        s = min(range(max(1, guess - 2), guess + 3), key=lambda s: abs(s + half_up(frac * s) - target))
        if s > (1 - decay) * steps:  # a branch must fork in the stable phase: lengthen the run
            steps = math.ceil(s / (1 - decay))
        at.add(s * batch)
    return steps * batch, at


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    vw_opts = vw.SPACE.options({k: opts[k] for k in _VW_OPTIONS})
    sizes = sorted(opts["sizes"])
    multipliers = opts["lr_scan"] or [1.0]
    out: list[Candidate] = []
    refs: dict[float, int] = {}
    for size, family in product(sizes, opts["families"]):
        trunk = _size_settings(fixed, opts, size)
        at = {**fixed, **trunk}
        point, reason = vw.build(at, vw_opts, family=family, E=opts["experts_per_layer"],
                                 top_k=model_value(fixed, "top_k"), n_layers=trunk["model.n_layers"])
        if point is None or reason:
            out.append((point, reason))
            continue
        point = {**trunk, **point}
        c = count(model_config({**fixed, **point}, require_reachable=False), seq_len=train_value(fixed, "seq_len"))
        n_active = c.n_params_active
        refs.setdefault(sizes[0], n_active)  # N_ref of the power rule: the smallest size's first family
        if opts["lr_scan_only"] and n_active not in {int(n) for n in opts["lr_scan_only"]}:
            continue  # an LR stage's extension: only the sizes whose optimum was at an edge
        scan = bool(opts["lr_scan"])
        if opts["isoflop_budgets"] and not scan and not isoflop_tokens(
                opts["isoflop_budgets"], c.flops_per_token, n_active, tuple(opts["isoflop_tpp"])):
            out.append((point, f"no IsoFLOP budget within {opts['isoflop_tpp']} tokens per parameter "
                               f"(N = {n_active:,})"))
            continue
        for m in multipliers:
            out.append(({**point, **_train_settings(fixed, opts, n_active, refs[sizes[0]], m, scan,
                                                    c.flops_per_token)}, None))
    return out


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    points = [p for p, why in _candidates(fixed, opts) if p is not None and not why]
    if not points:
        return None, "the ladder has no valid point"
    i = trial.suggest_int("space.point", 0, len(points) - 1)
    return points[i], None


def _check(opts: dict[str, Any]) -> None:
    if not opts["sizes"]:
        raise ConfigError("space.sizes", opts["sizes"], "must list the ladder's sizes (values of space.dial)")
    if opts["dial"] in ("d_model", "n_layers") and not all(float(s).is_integer() for s in opts["sizes"]):
        raise ConfigError("space.sizes", opts["sizes"], f"must be integers for dial {opts['dial']!r}")
    tpp = opts["isoflop_tpp"]
    if len(tpp) != 2 or tpp[0] >= tpp[1]:
        raise ConfigError("space.isoflop_tpp", tpp, "must be [low, high] tokens per parameter, low < high")
    if opts["lr_rule"] not in ("fixed", "power") and not Path(opts["lr_rule"]).is_file():
        raise ConfigError("space.lr_rule", opts["lr_rule"], "must be 'fixed', 'power' or an existing rule file "
                          "(moue lr-rule)")


SPACE = Space(
    name="ladder",
    description="a size ladder from one dial (d_model, n_layers or active params): heads, expert width, router "
                "state, tokens, warm-up and LR derived per size; families iso-active per size",
    defaults={
        "families": list(vw.FAMILIES[:3]),  # the three architectures
        "dial": "d_model",
        "sizes": [32, 48, 64, 96],
        "experts_per_layer": 4,
        "head_dim": 16,
        "expert_ratio": 0.0,  # 0: the study's expert_hidden / d_model
        "router_state_ratio": 0.25,
        "tokens_per_param": 20.0,  # 0: the study's budget
        "warmup": "per_param",
        "lr_rule": "fixed",
        "lr_exponent": 0.0,
        "lr_ref_params": 0.0,
        "lr_scan": [],  # the LR stage: multipliers of each size's LR
        "lr_scan_tokens_per_param": 5.0,
        "lr_scan_only": [],  # the LR stage's bracket extension: only sizes of these active counts
        "cooldowns": [],  # wsd cooldown branches at these fractions of each trial's tokens
        "isoflop_budgets": [],  # training FLOPs: an IsoFLOP design from cooldown branches (wsd)
        "isoflop_tpp": [2.0, 300.0],  # tokens per parameter a size may train at to join a budget
        **{k: vw.SPACE.defaults[k] for k in _VW_OPTIONS},
    },
    smoke={"families": ["layerwise"], "sizes": [16, 32], "tokens_per_param": 0.05, "warmup": "study",
           "active_tol": 0.5},
    candidates=_candidates,
    define_fn=_define,
    choices={"families": vw.FAMILIES, "dial": ("d_model", "n_layers", "active_params"),
             "warmup": ("per_param", "study"), **{k: v for k, v in vw.SPACE.choices.items() if k in _VW_OPTIONS}},
    bounds={"sizes": (1, 1e12), "experts_per_layer": (1, 1024), "head_dim": (2, 1024), "expert_ratio": (0, 64),
            "router_state_ratio": (0.0, 16.0), "tokens_per_param": (0.0, 1e6), "lr_exponent": (-4.0, 4.0),
            "lr_ref_params": (0.0, 1e15), "lr_scan": (1e-4, 1e4), "lr_scan_only": (1, 1e15), "lr_scan_tokens_per_param": (1e-3, 1e6),
            "cooldowns": (0.01, 0.8), "isoflop_budgets": (1.0, 1e30), "isoflop_tpp": (1e-3, 1e6),
            **{k: v for k, v in vw.SPACE.bounds.items() if k in _VW_OPTIONS}},
    item_types={"sizes": float, "lr_scan": float, "cooldowns": float, "lr_scan_only": float,
                "isoflop_budgets": float, "isoflop_tpp": float},
    check=_check,
)
