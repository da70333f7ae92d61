"""Compute-optimal allocation three ways (Hoffmann et al. 2022), side by side so disagreement shows.

- **Approach 1, the envelope of training curves** (``envelope``): every run's validation curve as
  loss against compute ``C = flops_per_token * tokens`` (log-log interpolation between marks); at
  each of ``points`` log-spaced compute values the run with the lowest loss gives ``N_opt(C)``, and
  ``D_opt = C / flops_per_token`` of that run; ``N_opt ~ C^a`` and ``D_opt ~ C^b`` by least squares
  on the distinct optima; a bootstrap over runs (resampled with replacement) gives 95% intervals.
  Caveat, noted in every result: a mark before a run's end is not a decayed loss (its learning
  rate has not annealed), which biases the envelope towards the runs that end there; cooldown
  branches (``train.cooldown_at``) or runs at several horizons remove the bias.
- **Approach 2, IsoFLOP profiles**: ``moue.analysis.isoflop``.
- **Approach 3, the parametric fit**: the ``a_opt`` / ``b_opt`` derived from a fitted law with
  ``N`` and ``D`` terms (``chinchilla`` and its virtual-width forms).

``three_approaches`` returns one row per approach with its exponents, intervals and verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Envelope", "ApproachRow", "envelope", "three_approaches"]


@dataclass(frozen=True)
class Envelope:
    a: float
    a_ci: tuple[float, float]
    b: float
    b_ci: tuple[float, float]
    compute: tuple[float, ...]  # the grid points with an optimum
    n_opt: tuple[float, ...]
    n_levels: int  # distinct N among the optima
    identified: bool
    reasons: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ApproachRow:
    approach: str
    a: float | None
    a_ci: tuple[float, float] | None
    b: float | None
    b_ci: tuple[float, float] | None
    identified: bool
    reasons: tuple[str, ...]


NOTE_UNDECAYED = ("intermediate marks are not decayed losses (the learning rate has not annealed there): the "
                  "envelope is biased towards runs that end at each compute")


def _optima(curves, grid):
    """(N, flops per token) of the best run at each grid compute, NaN where no run covers it."""
    best = np.full(grid.size, np.inf)
    pick = np.full((grid.size, 2), np.nan)
    lc = np.log(grid)
    for n, fpt, c, loss in curves:
        lo, hi = np.log(c[0]), np.log(c[-1])
        inside = (lc >= lo) & (lc <= hi)
        if not inside.any():
            continue
        val = np.interp(lc[inside], np.log(c), np.log(loss))
        better = val < best[inside]
        idx = np.flatnonzero(inside)[better]
        best[idx] = val[better]
        pick[idx] = (n, fpt)
    return pick


def _slopes(grid, pick) -> tuple[float, float]:
    ok = np.isfinite(pick[:, 0])
    lc = np.log(grid[ok])
    a = np.polyfit(lc, np.log(pick[ok, 0]), 1)[0]
    b = np.polyfit(lc, np.log(grid[ok] / pick[ok, 1]), 1)[0]
    return float(a), float(b)


def envelope(runs: Mapping[str, tuple[float, float, np.ndarray, np.ndarray]], *, points: int = 40,
             bootstrap: int = 1000, seed: int = 0) -> Envelope:
    """Approach 1 over ``runs``: run id -> (N, flops per token, tokens at each mark, loss at each mark)."""
    curves = []
    for n, fpt, tokens, loss in runs.values():
        tokens, loss = np.asarray(tokens, float), np.asarray(loss, float)
        keep = (tokens > 0) & np.isfinite(loss) & (loss > 0)
        if keep.sum() >= 2:
            order = np.argsort(tokens[keep])
            curves.append((float(n), float(fpt), fpt * tokens[keep][order], loss[keep][order]))
    if len(curves) < 2:
        from moue.analysis.errors import AnalysisError

        raise AnalysisError("curves", f"{len(curves)} runs with 2 or more marks", "must be at least 2 runs")
    c_lo = min(c[2][0] for c in curves)
    c_hi = max(c[2][-1] for c in curves)
    grid = np.logspace(math.log10(c_lo), math.log10(c_hi), points)
    pick = _optima(curves, grid)
    a, b = _slopes(grid, pick)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        sub = [curves[i] for i in rng.integers(0, len(curves), len(curves))]
        p = _optima(sub, grid)
        if len(np.unique(p[np.isfinite(p[:, 0]), 0])) >= 2:
            samples.append(_slopes(grid, p))
    arr = np.array(samples) if samples else np.full((1, 2), np.nan)
    a_ci = tuple(float(v) for v in np.nanpercentile(arr[:, 0], [2.5, 97.5]))
    b_ci = tuple(float(v) for v in np.nanpercentile(arr[:, 1], [2.5, 97.5]))
    ok = np.isfinite(pick[:, 0])
    n_levels = len(np.unique(pick[ok, 0]))
    reasons = []
    if n_levels < 3:
        reasons.append(f"the envelope has {n_levels} distinct N (at least 3 are needed)")
    if math.log10(c_hi / c_lo) < 1:
        reasons.append(f"the curves span {math.log10(c_hi / c_lo):.2f} decades of compute (at least 1 is needed)")
    for name, est, (lo, hi) in (("a", a, a_ci), ("b", b, b_ci)):
        if not (math.isfinite(lo) and hi - lo < abs(est)):
            reasons.append(f"{name}'s 95% interval [{lo:.3g}, {hi:.3g}] is wider than its estimate {est:.3g}")
    return Envelope(a=a, a_ci=a_ci, b=b, b_ci=b_ci, compute=tuple(float(v) for v in grid[ok]),
                    n_opt=tuple(float(v) for v in pick[ok, 0]), n_levels=n_levels, identified=not reasons,
                    reasons=tuple(reasons), notes=(NOTE_UNDECAYED,))


def three_approaches(*, env: Envelope | None = None, iso=None, fits: Mapping | None = None) -> list[ApproachRow]:
    """One row per approach that could be computed: Approach 1 (``env``), 2 (``iso``, an
    ``IsoFlopResult``) and 3 (each law of ``fits`` deriving ``a_opt``, ``b_opt``)."""
    rows = []
    if env is not None:
        rows.append(ApproachRow("1: envelope of training curves", env.a, env.a_ci, env.b, env.b_ci,
                                env.identified, env.reasons))
    if iso is not None:
        rows.append(ApproachRow("2: IsoFLOP profiles", iso.a, iso.a_ci, iso.b, iso.b_ci, iso.identified,
                                iso.reasons))
    for name, r in (fits or {}).items():
        if "a_opt" in r.derived:
            v = r.verdict
            rows.append(ApproachRow(f"3: parametric ({name})", r.derived["a_opt"], r.derived_ci.get("a_opt"),
                                    r.derived.get("b_opt"), r.derived_ci.get("b_opt"), v.identified, v.reasons))
    return rows
