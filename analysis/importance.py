"""Which of a study's search axes matter: parameter importance of the finished trials.

The axes are the settings that vary independently across the study's finished trials
(:func:`search_axes`): the family and the ``model.*`` / ``train.*`` params with more than one
value that are not a function of the others (a ladder's heads, tokens and LR follow its size). The trials become an Optuna study in memory
(``optuna.trial.create_trial``, one per run, its final validation loss the value) and Optuna's
PED-ANOVA (Watanabe et al. 2023) scores each axis: how differently it is distributed in the best
trials than in all of them. PED-ANOVA needs no surrogate model and no scikit-learn. Its top
quantile is ``max(0.1, 5 / n)`` so at least 5 trials form it; with fewer than ``MIN_TRIALS``
trials no importance is computed (a handful of points ranks noise).

Importances are relative (they sum to 1 over the axes) and say nothing about direction; an axis
that moves with another one (a ladder's learning rate is a function of its size) shares its
importance with it (``search_axes`` keeps only one of two axes that determine each other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MIN_TRIALS", "Importance", "parameter_importance", "search_axes"]

MIN_TRIALS = 8
# settings moue's spaces derive (matched widths, a ladder's per-size rules): of two columns that
# determine each other, the other one is the axis
_OFTEN_DERIVED = ("model.expert_hidden", "model.router_state_dim", "model.n_heads", "model.dense_hidden",
                  "train.tokens", "train.warmup_frac", "train.lr", "train.batch_tokens")
_SKIP = ("train.seed", "data.seed", "train.cooldown_at", "train.device", "train.threads", "train.init_from",
         "train.eval_every_tokens", "train.compile")


@dataclass(frozen=True)
class Importance:
    scores: dict[str, float]  # axis -> importance (sums to 1), largest first
    n_trials: int
    target_quantile: float
    method: str = "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator)"


def search_axes(frame) -> list[str]:
    """The columns of ``frame`` that vary independently: ``family`` and ``model.*`` / ``train.*``
    params with more than one value (seeds and bookkeeping left out), without those that are a
    function of the axes kept before them. The family comes first, then, each time, the column that
    with the kept ones determines most of the others (ties: not a setting moue's spaces derive, such
    as a matched expert width; ``model.*`` before ``train.*``; fewer distinct values); numbers are compared at 2 significant digits (a ladder's per-family token
    counts and warm-up fractions differ by rounding only). So a ladder keeps its family and its
    dial and drops the heads, expert width, tokens, warm-up and learning rate it derives from them;
    a grid keeps its axes and drops the matched widths and counts."""
    import polars as pl

    cols = [c for c in frame.columns if c == "family" or (c.startswith(("model.", "train.")) and c not in _SKIP)]
    coarse = {}
    for c in cols:
        v = frame.get_column(c)
        if v.null_count() or not (v.dtype.is_numeric() or v.dtype in (pl.String, pl.Boolean)):
            continue
        v = pl.Series(c, _two_digits(v.to_numpy())) if v.dtype.is_numeric() else v
        if v.n_unique() > 1:
            coarse[c] = v
    table = pl.DataFrame(list(coarse.values())) if coarse else pl.DataFrame()

    def determined(by: list[str], c: str) -> bool:
        return bool(by) and table.group_by(by).agg(pl.col(c).n_unique().alias("k"))["k"].max() == 1

    kept: list[str] = ["family"] if "family" in coarse else []
    left = [c for c in coarse if c not in kept and not determined(kept, c)]
    while left:  # the column that, with the kept ones, determines most of the rest (then: fewest values)
        best = min(left, key=lambda c: (-sum(determined([*kept, c], o) for o in left if o != c),
                                        c in _OFTEN_DERIVED, not c.startswith("model."), coarse[c].n_unique(), c))
        kept.append(best)
        left = [c for c in left if c != best and not determined(kept, c)]
    return kept


def _two_digits(x):
    import numpy as np

    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(x == 0, 1.0, 10.0 ** (np.floor(np.log10(np.abs(x))) - 1))
    return np.round(x / scale) * scale


def parameter_importance(frame, *, loss: str = "final/val_loss", seed: int = 0) -> Importance | None:
    """PED-ANOVA importances of ``frame``'s search axes for ``loss`` (lower is better); ``None``
    with fewer than ``MIN_TRIALS`` finite losses or no axis that varies."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import PedAnovaImportanceEvaluator

    frame = frame.filter(frame.get_column(loss).is_finite())
    axes = search_axes(frame)
    if frame.height < MIN_TRIALS or not axes:
        return None
    dists = {}
    for c in axes:
        v = frame.get_column(c)
        if v.dtype.is_numeric() and v.n_unique() > 2:
            lo, hi = float(v.min()), float(v.max())
            dists[c] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 10)
        else:
            dists[c] = CategoricalDistribution(tuple(sorted({_plain(x) for x in v.to_list()}, key=str)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    values = frame.get_column(loss).to_list()
    for i in range(frame.height):
        params = {c: (float(frame[c][i]) if isinstance(dists[c], FloatDistribution) else _plain(frame[c][i]))
                  for c in axes}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(values[i])))
    q = max(0.1, 5 / frame.height)
    raw = optuna.importance.get_param_importances(
        study, evaluator=PedAnovaImportanceEvaluator(target_quantile=q), normalize=True)
    scores = {k: float(v) for k, v in sorted(raw.items(), key=lambda kv: -kv[1]) if math.isfinite(v)}
    return Importance(scores=scores, n_trials=frame.height, target_quantile=q)


def _plain(x):
    """A value Optuna's categorical distribution accepts (None, bool, int, float, str)."""
    return x if x is None or isinstance(x, (bool, int, float, str)) else str(x)
