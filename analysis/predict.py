"""Prediction intervals: where a new run's loss will fall, with the fit's parameter uncertainty and
the runs' noise (docs/FITTING.md, "Prediction intervals").

A new run at ``x`` misses the fitted law for three reasons: the parameters are uncertain (the
bootstrap resamples say how much; that spread grows with the distance a prediction extrapolates), a
run scatters about the law (seed and data noise), and the law's form is not exactly right, which
the residuals hide and extrapolation shows. On the law's own scale (ln L; log10 L for log10 laws)::

    y_new(x)  ~  t*_b(x) + s(x) T_nu          an equal mixture over the B bootstrap resamples b
    s(x)^2 = residual_sd^2 + misfit_sd(x)^2

``t*_b`` is resample b's prediction (Davison & Hinkley 1997, section 6.3.3, in the percentile form
the rest of the package uses) and ``T_nu`` Student's t; the interval is the central ``level`` range
of the mixture (bisection on its CDF), mapped back to loss: deterministic, no Monte-Carlo draw. The
noise (:class:`Noise`, estimated by ``moue.analysis.fitting.fit_noise``):

- ``residual_sd^2 = sum e_i^2 / (n - p)``: the scatter of the runs about the law (replicate seeds
  included), with ``n - p`` degrees of freedom.
- ``misfit_sd(x)^2``: what the law's errors hold, when it extrapolates the way ``x`` does, beyond
  that scatter and beyond its own parameter uncertainty. A law's form can be right along one
  variable and wrong along another (Clark et al.'s law bends away from the data along N and holds
  along the expert count), so the misfit is measured per direction
  (:func:`extrapolation_directions`): each law variable, and ``6ND`` for a law in N and D (data fill
  the (N, D) plane only below their largest compute, so a point beyond it extrapolates even when N
  and D each lie inside their ranges). Along each direction, at cuts at its 50, 60, 70, 80 and 90%
  quantiles (:func:`extrapolation_folds`), the law is refitted on the points below the cut and
  predicts the points above it (errors ``e_j``); a bootstrap of that refit gives the variance
  ``v_j`` of its prediction there; the direction's misfit is
  ``sqrt(max(0, mean(e_j^2 - v_j) - residual_sd^2))`` (a fold whose refit hits the iteration limit
  is left out). A prediction takes
  the misfit of the directions along which ``x`` lies beyond the fit's data (below its smallest
  value or above its largest by more than :data:`RANGE_TOL`, :meth:`Noise.misfit_at`): none inside
  the data's range on every direction (an interpolation: the classical interval), the largest where
  it lies beyond on several (a fold along one direction already holds the errors of the directions
  that move with it, so a sum would count them twice). A direction no fold could measure borrows the
  largest misfit measured. When the law is right the misfits are about 0. The folds' errors move
  together (a fold's errors share its refit), so a misfit carries one degree of freedom per fold.
- ``nu``: Welch-Satterthwaite's degrees of freedom of the sum, at each point.

What was measured (docs/FITTING.md): on Epoch's Chinchilla points held out at C >= 1e21 the residuals'
own percentiles cover 70% of them, ``1.96 residual_sd`` 78%, this method 87% at 1.44x the hold-out
RMSE (the held-out points miss the law by about twice what any split of the training rows shows);
on Clark et al.'s routers held out at 512 experts (beyond the training rows in E only, where the law
holds) it covers all 6 points of each at 1.75-2.06x the RMSE, where one misfit for every x (N's)
gave 8.4-9.5x; in a simulation from a known law it covers about 96%.

Limits: a misfit is one figure for every distance beyond the data (the bootstrap term is what grows
with distance), measured upward (a point below the data borrows the upward figure); the ranges are
per direction, so a point inside every range can still lie off the data's cloud (``6ND`` covers the
common case); a fit without a bootstrap has no interval (the noise alone would claim a precision the
fit does not have).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from moue.analysis.errors import AnalysisError
from moue.analysis.laws import Law

__all__ = ["FOLD_BOOTSTRAP", "FOLD_QUANTILES", "RANGE_TOL", "Direction", "NextPrediction", "Noise", "Prediction",
           "direction_values", "extrapolation_directions", "extrapolation_folds", "next_prediction",
           "prediction_interval"]

#: Quantiles of a direction at which :func:`extrapolation_folds` cuts the data.
FOLD_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)
#: Bootstrap resamples of each fold's refit (its prediction variance; fewer when the fit has fewer).
FOLD_BOOTSTRAP = 100
#: A value within this fraction of the data's smallest or largest along a direction lies inside its
#: range: sizes and token counts are quoted to two or three figures, and one model can carry two
#: (Epoch's digitised Chinchilla sizes differ by 1e-6 between rows of one model).
RANGE_TOL = 0.01


@dataclass(frozen=True, kw_only=True)
class Direction:
    """One direction a prediction can extrapolate along (a law variable, or ``6ND``): the range of
    the fit's data along it and the law's misfit when it extrapolates that way."""

    lo: float  # smallest and largest value among the fit's rows: beyond them a prediction extrapolates
    hi: float
    misfit_sd: float = 0.0  # the folds' errors beyond noise and parameter uncertainty
    n_folds: int = 0  # 0: no fold could be refitted along it (it borrows the largest measured misfit)
    n_errors: int = 0  # errors the folds pool (a point above several cuts counts once per fold)


@dataclass(frozen=True, kw_only=True)
class Noise:
    """Run-to-run noise of a fit on the law's scale (ln L, or log10 L), for prediction intervals:
    the residuals' scatter and, by direction, the law's misfit when it extrapolates (the module's
    docstring). :meth:`at` gives the scale and degrees of freedom that apply at given points."""

    residual_sd: float  # sqrt(sum e^2 / (n - p)) of the fit's residuals
    residual_df: int  # n - p
    misfit_sd: float = 0.0  # the largest direction's (a result without directions: the one for every x)
    extrapolation_rms: float = math.nan  # RMS of every fold's errors (NaN: no fold could be refitted)
    n_folds: int = 0  # over all directions
    n_errors: int = 0
    directions: Mapping[str, Direction] = field(default_factory=dict)  # {}: read from an older file

    def __post_init__(self) -> None:
        object.__setattr__(self, "directions", types.MappingProxyType(dict(self.directions)))

    def misfit_at(self, data: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The misfit sd that applies at each point of ``data`` (law variable -> values) and the
        folds it rests on, (m,) each: the largest misfit of the directions along which the point lies
        beyond the fit's data (below its smallest value or above its largest, by more than
        :data:`RANGE_TOL`); 0 where it lies within the data's range on every direction (an
        interpolation). A direction no fold could measure borrows the largest measured misfit. A
        result without directions (an older file) has one misfit for every point."""
        m = np.atleast_1d(next(iter(data.values()))).size if data else 0
        if not self.directions:
            return np.full(m, self.misfit_sd), np.full(m, self.n_folds)
        sd, folds = np.zeros(m), np.zeros(m, dtype=np.int64)
        measured = [d for d in self.directions.values() if d.n_folds]
        fallback = max(measured, key=lambda d: d.misfit_sd) if measured else None
        for name, d in self.directions.items():
            source = d if d.n_folds else fallback
            if source is None:
                continue
            x = direction_values(data, name)
            beyond = (x < d.lo / (1 + RANGE_TOL)) | (x > d.hi * (1 + RANGE_TOL))
            take = beyond & (source.misfit_sd > sd)
            sd[take], folds[take] = source.misfit_sd, source.n_folds
        return sd, folds

    def at(self, data: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The noise scale ``sqrt(residual_sd^2 + misfit_sd^2)`` at each point of ``data`` and its
        Welch-Satterthwaite degrees of freedom (``n - p`` for the residuals, one per fold for the
        misfit), (m,) each."""
        misfit, n_folds = self.misfit_at(data)
        a, b = self.residual_sd**2, misfit**2
        df = np.full(b.shape, self.residual_df, dtype=np.int64)  # no misfit: the residuals' own
        on = (b > 0) & (n_folds > 0)
        df[on] = np.maximum(1, np.round((a + b[on]) ** 2 / (a**2 / self.residual_df + b[on] ** 2 / n_folds[on])))
        return np.sqrt(a + b), df


@dataclass(frozen=True, eq=False)  # arrays: compare the fields, not the objects
class Prediction:
    """Predicted loss at each point (``pred``: the fit's optimum) and the interval ``[lo, hi]`` a
    new run there falls in with probability ``level``; arrays of one shape."""

    pred: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    level: float = 0.95

    @property
    def half_width(self) -> np.ndarray:
        return (self.hi - self.lo) / 2


def extrapolation_directions(variables) -> tuple[str, ...]:
    """The directions a fit of a law in ``variables`` can extrapolate along: each variable, and
    ``6ND`` (the compute of Kaplan et al.'s approximation) for a law in ``N`` and ``D`` without ``C``,
    since such data fill the (N, D) plane only below their largest compute."""
    extra = ("6ND",) if {"N", "D"} <= set(variables) and "C" not in variables else ()
    return tuple(variables) + extra


def direction_values(data: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """The values of direction ``name`` (a law variable, or ``6ND``) at the points of ``data``."""
    if name == "6ND":
        return 6.0 * np.asarray(data["N"], dtype=np.float64) * np.asarray(data["D"], dtype=np.float64)
    return np.asarray(data[name], dtype=np.float64)


def extrapolation_folds(values: np.ndarray) -> list[np.ndarray]:
    """The training rows of each extrapolation fold along one direction (boolean masks): the rows
    below each cut at :data:`FOLD_QUANTILES` of ``values``; a fold predicts the rows at or above its
    cut. Cuts that coincide (ties) give one fold."""
    values = np.asarray(values, dtype=np.float64)
    cuts = np.unique(np.quantile(values, FOLD_QUANTILES, method="inverted_cdf"))
    return [values < c for c in cuts]


def prediction_interval(law: Law, theta: np.ndarray, bootstrap: np.ndarray, noise: Noise,
                        data: Mapping[str, np.ndarray], *, level: float = 0.95) -> Prediction:
    """The prediction interval of a fit of ``law`` at ``data`` (law variable -> values).

    ``theta``: the optimum in the fitted parametrisation (P,); ``bootstrap``: natural parameters of
    the resamples (B, P), B >= 2; ``noise``: the fit's :class:`Noise` (its scale at each point
    depends on where the point lies against the fit's data: :meth:`Noise.at`)."""
    if not 0 < level < 1:
        raise AnalysisError("level", level, "must be in (0, 1)")
    bootstrap = np.asarray(bootstrap, dtype=np.float64)
    if bootstrap.ndim != 2 or bootstrap.shape[0] < 2:
        raise AnalysisError("prediction interval", f"{bootstrap.shape[0]} bootstrap resamples",
                            "needs a fit with a bootstrap (n_bootstrap >= 2)")
    point = law.predict(np.asarray(theta, dtype=np.float64)[None, :], data)[0]  # (m,)
    centres = law.predict(law.from_natural(bootstrap), data)  # (B, m)
    q = np.array([(1 - level) / 2, 1 - (1 - level) / 2])
    scale, df = noise.at(data)
    lo, hi = _mixture_quantiles(centres, scale, df, q)
    back = (lambda t: 10.0**t) if law.log10 else np.exp
    return Prediction(pred=back(point), lo=back(lo), hi=back(hi), level=level)


def _mixture_quantiles(centres: np.ndarray, scale: np.ndarray, df: np.ndarray, q: np.ndarray,
                       *, chunk: int = 64) -> np.ndarray:
    """Quantiles ``q`` (k,) of the equal mixture of ``centres[b, j] + scale[j] * T_df[j]`` for each
    column j of ``centres`` (B, m), ignoring non-finite centres: (k, m), by bisection on the
    mixture's CDF (a column without noise: the percentiles of its centres)."""
    from scipy import special

    k, m = q.size, centres.shape[1]
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (m,))
    df = np.broadcast_to(np.asarray(df, dtype=np.float64), (m,))
    out = np.full((k, m), np.nan)
    for j in np.flatnonzero(~(scale > 0)):  # no noise: the bootstrap percentiles themselves
        col = centres[:, j][np.isfinite(centres[:, j])]
        if col.size:
            out[:, j] = np.quantile(col, q)
    noisy = np.flatnonzero(scale > 0)
    for start in range(0, noisy.size, chunk):
        cols = noisy[start:start + chunk]
        c, s, d = centres[:, cols], scale[cols], df[cols]
        z = special.stdtrit(d[None, :], q[:, None])  # (k, chunk): quantiles of each T_df
        ok = np.isfinite(c)
        n_ok = ok.sum(axis=0)
        c0 = np.where(ok, c, 0.0)
        # the mixture's q-quantile lies between those of its lowest and highest component
        a = np.where(ok, c, np.inf).min(axis=0)[None, :] + s * z
        b = np.where(ok, c, -np.inf).max(axis=0)[None, :] + s * z
        for _ in range(40):  # the bracket (the spread of the centres) shrinks 1e12-fold
            mid = (a + b) / 2
            cdf = (special.stdtr(d, (mid[:, None, :] - c0[None]) / s) * ok[None]).sum(axis=1)
            below = cdf < q[:, None] * n_ok[None, :]
            a, b = np.where(below, mid, a), np.where(below, b, mid)
        out[:, cols] = np.where(n_ok[None, :] > 0, (a + b) / 2, np.nan)
    return out


# ----------------------------------------------------------------------------- the next size up


@dataclass(frozen=True, kw_only=True)
class NextPrediction:
    """A prediction one step beyond a study's runs: the law variables it is made at (``inputs``),
    the predicted loss, its interval at ``level`` and what the step is (``what``)."""

    inputs: Mapping[str, float]
    pred: float
    lo: float
    hi: float
    level: float
    what: str

    def to_dict(self) -> dict:
        """As ``moue report --json`` writes it."""
        return {"inputs": dict(self.inputs), "pred": self.pred, "lo": self.lo, "hi": self.hi,
                "level": self.level, "what": self.what}

    def sentence(self, law: str) -> str:
        """One sentence for the report's summary."""
        at = ", ".join(f"{k} = {v:.3g}" for k, v in self.inputs.items())
        return (f"{law} predicts loss {self.pred:.4g} ({self.level:.0%} prediction interval "
                f"[{self.lo:.4g}, {self.hi:.4g}]) at {self.what}: {at}.")


def next_prediction(result, frame, *, columns: Mapping[str, str],
                    size_tol: float = 0.1) -> NextPrediction | None:
    """The loss a fit (a :class:`~moue.analysis.result.FitResult`) predicts one step beyond the
    rows of ``frame`` it was fitted on (polars or a mapping of columns), with its prediction
    interval; ``None`` without a bootstrap or when the rows lack a variable it needs.

    ``columns`` names the column of ``N`` (active parameters), ``D`` (tokens), ``C`` (compute) and
    the other law variables (``V``, ``E``), as ``moue.analysis.fitting.DEFAULT_COLUMNS`` does. The
    step scales the study's largest run along its own allocation (its tokens per parameter kept;
    other variables kept):

    - a ladder (two or more sizes ``N``; counts within ``size_tol`` are one size, as a ladder's
      families are iso-active within a few percent): the next size up, ``N`` times
      the ladder's last step (largest size over the one below it), ``D`` with it, ``C`` with both;
    - otherwise: 10x the largest compute (``N`` and ``D`` each times sqrt(10)).
    """
    from moue.analysis.points import column_values

    if result.n_bootstrap < 2 or result.noise is None:
        return None
    law = result.law_spec
    cols = {}
    for v, name in columns.items():
        values = column_values(frame, name)
        if values is not None:
            cols[v] = np.asarray(values, dtype=np.float64)
    compute = _compute_of(cols)
    if compute is None or any(v not in cols for v in law.variables):
        return None
    sizes = _sizes(cols["N"], size_tol) if "N" in cols else []
    if len(sizes) >= 2:
        step = sizes[-1] / sizes[-2]
        what = f"the next size up the ladder (N x{step:.3g})"
        top = _largest_of_size(cols["N"], compute, sizes[-1], size_tol)
        c_factor = step * step  # at the size's tokens per parameter
    else:
        step, c_factor = math.sqrt(10.0), 10.0
        what = "10x the largest compute"
        top = int(np.nanargmax(compute))
    scale = {"N": step, "D": step, "C": c_factor}
    inputs = {v: float(cols[v][top]) * scale.get(v, 1.0) for v in law.variables}
    p = result.predict({k: np.array([x]) for k, x in inputs.items()}, interval=True)
    return NextPrediction(inputs=inputs, pred=float(p.pred[0]), lo=float(p.lo[0]), hi=float(p.hi[0]),
                          level=p.level, what=what)


def _compute_of(cols: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if "C" in cols:
        return cols["C"]
    if "N" in cols and "D" in cols:
        return 6.0 * cols["N"] * cols["D"]
    return None


def _sizes(n: np.ndarray, tol: float) -> list[float]:
    """Distinct sizes, ascending; values within ``tol`` (relative) of a smaller one join it."""
    out: list[float] = []
    for x in np.sort(n[np.isfinite(n)]):
        if not out or x > out[-1] * (1 + tol):
            out.append(float(x))
    return out


def _largest_of_size(n: np.ndarray, compute: np.ndarray, size: float, tol: float) -> int:
    """The row of the largest size with the most compute (its final point, not a cooldown branch)."""
    rows = np.flatnonzero(n >= size / (1 + tol))
    return int(rows[np.nanargmax(compute[rows])])
