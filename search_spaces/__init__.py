"""search_spaces: what a study samples. Declarative, pure Python (never imports torch or ray).

Each named ``Space`` turns a study's fixed settings (flat dotted keys, e.g. ``{"model.d_model":
128, "train.tokens": 524288}``; a missing key means moue_core's default) and the options of the
spec's ``[space]`` table into points: flat dotted overrides (``{"model.pool_size": 32,
"model.window": 8, "model.stride": 4}``) under ``model.``, ``train.``, ``data.`` or ``convert.``.

- ``space.grid(fixed, options)`` -> explicit points for ``grid``; ``space.grid_pruned`` also returns
  the pruned points with their reasons (the dry run prints them).
- ``space.define(trial, fixed, options)`` -> Optuna define-by-run for ``tpe`` / ``random``, with
  the same distributions in every trial; returns the whole point. Search coordinates that are not
  settings are suggested as ``space.<name>`` (a family, a fraction): they appear in
  ``trial.params`` but never in a point, so build a trial's config from the returned point (or
  drop ``space.*`` keys from the params).
- ``check_point(flat)`` / ``prune(points, fixed)``: whether merged settings can run, and why not.
- Matching helpers from honest counts: ``active_params``, ``total_params``, ``virtual_width``,
  ``match_expert_hidden`` (iso-active), ``match_pool_size`` (iso-total), ``topology_family``.

Shipped spaces: ``virtual_width``, ``pool_size``, ``rotation``, ``depth``, ``router_balance``,
``conversion``, ``lr``, ``ladder`` (``search_spaces/spaces/<name>.py``: each docstring says what the space
studies and what it holds fixed).
"""

from __future__ import annotations

from moue.errors import ConfigError
from moue.search_spaces._space import SEARCH_PREFIX, Space
from moue.search_spaces.constraints import check_point, prune, train_defaults
from moue.search_spaces.spaces import conversion, depth, ladder, lr, pool_size, rotation, router_balance
from moue.search_spaces.spaces import virtual_width as _virtual_width
from moue.search_spaces.spaces.conversion import layerwise_base
from moue.search_spaces.matching import (
    active_params,
    counts,
    match_expert_hidden,
    match_pool_size,
    topology_family,
    total_params,
    virtual_width,
)

__all__ = [
    "SEARCH_PREFIX", "SPACES", "Space", "active_params", "check_point", "counts", "get_space",
    "layerwise_base", "match_expert_hidden", "match_pool_size", "prune", "topology_family",
    "total_params", "train_defaults", "virtual_width",
]

SPACES: dict[str, Space] = {
    module.SPACE.name: module.SPACE
    for module in (_virtual_width, pool_size, rotation, depth, router_balance, conversion, lr, ladder)
}


def get_space(name: str) -> Space:
    """The shipped space called ``name``; an unknown name raises ``ConfigError`` listing them."""
    if name not in SPACES:
        raise ConfigError("search.space", name, f"must be one of {', '.join(sorted(SPACES))}")
    return SPACES[name]

