"""``lr``: the learning rate per model size, to find each width's optimum before a scaling study.

Each point sets ``model.d_model`` (from ``d_models``) and ``train.lr`` (a log-spaced grid of
``lr_points`` values from ``lr_min`` to ``lr_max``, three significant digits; define-by-run draws it
log-uniformly from the same range). Optionally the expert hidden size follows the width
(``expert_hidden_ratio > 0``: ``f = ratio * d``, a multiple of 4) and so does the head count
(``head_dim > 0``: ``n_heads = d / head_dim``); at 0 they stay the study's.

Held fixed: depth, the pool and its topology, ``k``, the token budget, everything else the study
fixes. Active and total parameters grow with ``d`` and are reported by the counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import product
from typing import Any

from moue.errors import ConfigError
from moue.search_spaces._common import multiple_of_4
from moue.search_spaces._space import Candidate, Space

__all__ = ["SPACE", "lr_grid"]


def lr_grid(low: float, high: float, n: int) -> list[float]:
    """``n`` log-spaced learning rates from ``low`` to ``high``, three significant digits."""
    if n == 1:
        return [float(f"{math.sqrt(low * high):.3g}")]
    return [float(f"{low * (high / low) ** (i / (n - 1)):.3g}") for i in range(n)]


def _point(opts: dict[str, Any], d: int, lr: float) -> Candidate:
    point: dict[str, Any] = {"model.d_model": d, "train.lr": lr}
    if opts["expert_hidden_ratio"]:
        point["model.expert_hidden"] = multiple_of_4(opts["expert_hidden_ratio"] * d)
    if opts["head_dim"]:
        if d % opts["head_dim"]:
            return point, f"model.d_model ({d}) is not a multiple of space.head_dim ({opts['head_dim']})"
        point["model.n_heads"] = d // opts["head_dim"]
    return point, None


def _candidates(fixed: Mapping[str, Any], opts: dict[str, Any]) -> list[Candidate]:
    lrs = lr_grid(opts["lr_min"], opts["lr_max"], opts["lr_points"])
    return [_point(opts, d, lr) for d, lr in product(opts["d_models"], lrs)]


def _define(trial, fixed: Mapping[str, Any], opts: dict[str, Any]) -> Candidate:
    d = trial.suggest_categorical("model.d_model", opts["d_models"])
    lr = trial.suggest_float("train.lr", opts["lr_min"], opts["lr_max"], log=True)
    return _point(opts, d, lr)


def _check(opts: dict[str, Any]) -> None:
    if opts["lr_min"] > opts["lr_max"]:
        raise ConfigError("space.lr_min", opts["lr_min"], f"must be <= space.lr_max ({opts['lr_max']})")


SPACE = Space(
    name="lr",
    description="learning rate (log grid / log-uniform) per model width d_model",
    defaults={
        "d_models": [64, 128, 256],
        "lr_min": 1e-3,
        "lr_max": 3e-2,
        "lr_points": 5,
        "expert_hidden_ratio": 0.0,  # 0: the study's expert_hidden; > 0: f = ratio * d_model
        "head_dim": 0,  # 0: the study's n_heads; > 0: n_heads = d_model / head_dim
    },
    smoke={"d_models": [32], "lr_points": 3},
    candidates=_candidates,
    define_fn=_define,
    bounds={"d_models": (4, 65536), "lr_min": (1e-8, 10.0), "lr_max": (1e-8, 10.0), "lr_points": (1, 100),
            "expert_hidden_ratio": (0.0, 64.0), "head_dim": (0, 4096)},
    check=_check,
)
