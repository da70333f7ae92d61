"""Prediction intervals: where a new run's loss will fall, with the fit's parameter uncertainty and
the runs' noise (docs/FITTING.md, "Prediction intervals").

A new run at ``x`` misses the fitted law for three reasons: the parameters are uncertain (the
bootstrap resamples say how much; that spread grows with the distance a prediction extrapolates), a
run scatters about the law (seed and data noise), and the law's form is not exactly right, which
the residuals hide and extrapolation shows. On the law's own scale (ln L; log10 L for log10 laws)::

    y_new(x)  ~  t*_b(x) + s T_nu          an equal mixture over the B bootstrap resamples b
    s^2 = residual_sd^2 + misfit_sd^2

``t*_b`` is resample b's prediction (Davison & Hinkley 1997, section 6.3.3, in the percentile form
the rest of the package uses) and ``T_nu`` Student's t; the interval is the central ``level`` range
of the mixture (bisection on its CDF), mapped back to loss: deterministic, no Monte-Carlo draw. The
noise (:class:`Noise`, estimated by ``moue.analysis.fitting.fit_noise``):

- ``residual_sd^2 = sum e_i^2 / (n - p)``: the scatter of the runs about the law (replicate seeds
  included), with ``n - p`` degrees of freedom.
- ``misfit_sd^2``: what the law's errors when it extrapolates within its own data hold beyond that
  scatter and beyond its own parameter uncertainty. For each cut at the 50, 60, 70, 80 and 90%
  quantiles of the compute axis (:func:`extrapolation_folds`) the law is refitted on the points below
  the cut and predicts the points above it (errors ``e_j``); a bootstrap of that refit gives the
  variance ``v_j`` of its prediction there; ``misfit_sd^2 = max(0, mean(e_j^2 - v_j) - residual_sd^2)``.
  When the law is right this is about 0 and the interval is the classical one; when it bends away
  from the data as it extrapolates, the excess widens every interval. The folds' errors move
  together (a fold's errors share its refit), so this part carries one degree of freedom per fold.
- ``nu``: Welch-Satterthwaite's degrees of freedom of the sum.

What was measured (docs/FITTING.md): on Epoch's Chinchilla points held out at C >= 1e21 the residuals'
own percentiles cover 70% of them, ``1.96 residual_sd`` 78%, this method 87% (the held-out points
miss the law by about twice what any split of the training rows shows); in a simulation from a known
law it covers about 95%.

Limits: the misfit is one scale for every x (the bootstrap term is what grows with distance); a fit
without a bootstrap has no interval (the noise alone would claim a precision the fit does not have).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from moue.analysis.errors import AnalysisError
from moue.analysis.laws import Law

__all__ = ["FOLD_BOOTSTRAP", "FOLD_QUANTILES", "NextPrediction", "Noise", "Prediction", "extrapolation_folds",
           "next_prediction", "prediction_interval"]

#: Quantiles of the compute axis at which :func:`extrapolation_folds` cuts the data.
FOLD_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)
#: Bootstrap resamples of each fold's refit (its prediction variance; fewer when the fit has fewer).
FOLD_BOOTSTRAP = 100


@dataclass(frozen=True, kw_only=True)
class Noise:
    """Run-to-run noise of a fit on the law's scale (ln L, or log10 L), for prediction intervals:
    the residuals' scatter and the law's misfit when it extrapolates (the module's docstring)."""

    residual_sd: float  # sqrt(sum e^2 / (n - p)) of the fit's residuals
    residual_df: int  # n - p
    misfit_sd: float = 0.0  # the folds' extrapolation errors beyond noise and parameter uncertainty
    extrapolation_rms: float = math.nan  # RMS of those errors (NaN: no fold could be refitted)
    n_folds: int = 0
    n_errors: int = 0  # errors the folds pool (a point above several cuts counts once per fold)

    @property
    def scale(self) -> float:
        return math.sqrt(self.residual_sd**2 + self.misfit_sd**2)

    @property
    def df(self) -> int:
        """Welch-Satterthwaite degrees of freedom of ``scale^2`` (``n_folds`` for the misfit)."""
        a, b = self.residual_sd**2, self.misfit_sd**2
        if b == 0 or self.n_folds == 0:
            return self.residual_df
        return max(1, round((a + b) ** 2 / (a**2 / self.residual_df + b**2 / self.n_folds)))


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


def extrapolation_folds(compute: np.ndarray) -> list[np.ndarray]:
    """The training rows of each extrapolation fold (boolean masks): the rows below each cut at
    :data:`FOLD_QUANTILES` of ``compute``; a fold predicts the rows at or above its cut. Cuts that
    coincide (ties) give one fold."""
    compute = np.asarray(compute, dtype=np.float64)
    cuts = np.unique(np.quantile(compute, FOLD_QUANTILES, method="inverted_cdf"))
    return [compute < c for c in cuts]


def prediction_interval(law: Law, theta: np.ndarray, bootstrap: np.ndarray, noise: Noise,
                        data: Mapping[str, np.ndarray], *, level: float = 0.95) -> Prediction:
    """The prediction interval of a fit of ``law`` at ``data`` (law variable -> values).

    ``theta``: the optimum in the fitted parametrisation (P,); ``bootstrap``: natural parameters of
    the resamples (B, P), B >= 2; ``noise``: the fit's :class:`Noise`."""
    if not 0 < level < 1:
        raise AnalysisError("level", level, "must be in (0, 1)")
    bootstrap = np.asarray(bootstrap, dtype=np.float64)
    if bootstrap.ndim != 2 or bootstrap.shape[0] < 2:
        raise AnalysisError("prediction interval", f"{bootstrap.shape[0]} bootstrap resamples",
                            "needs a fit with a bootstrap (n_bootstrap >= 2)")
    point = law.predict(np.asarray(theta, dtype=np.float64)[None, :], data)[0]  # (m,)
    centres = law.predict(law.from_natural(bootstrap), data)  # (B, m)
    q = np.array([(1 - level) / 2, 1 - (1 - level) / 2])
    lo, hi = _mixture_quantiles(centres, noise.scale, noise.df, q)
    back = (lambda t: 10.0**t) if law.log10 else np.exp
    return Prediction(pred=back(point), lo=back(lo), hi=back(hi), level=level)


def _mixture_quantiles(centres: np.ndarray, scale: float, df: int, q: np.ndarray,
                       *, chunk: int = 64) -> np.ndarray:
    """Quantiles ``q`` (k,) of the equal mixture of ``centres[b] + scale * T_df`` for each column of
    ``centres`` (B, m), ignoring non-finite centres: (k, m), by bisection on the mixture's CDF."""
    from scipy import special

    k, m = q.size, centres.shape[1]
    out = np.full((k, m), np.nan)
    if not scale > 0:  # no noise: the bootstrap percentiles themselves
        for j in range(m):
            col = centres[:, j][np.isfinite(centres[:, j])]
            if col.size:
                out[:, j] = np.quantile(col, q)
        return out
    z = special.stdtrit(df, q)  # quantiles of T_df
    for start in range(0, m, chunk):
        c = centres[:, start:start + chunk]
        ok = np.isfinite(c)
        n_ok = ok.sum(axis=0)
        c0 = np.where(ok, c, 0.0)
        # the mixture's q-quantile lies between those of its lowest and highest component
        a = np.where(ok, c, np.inf).min(axis=0)[None, :] + scale * z[:, None]
        b = np.where(ok, c, -np.inf).max(axis=0)[None, :] + scale * z[:, None]
        for _ in range(40):  # the bracket (the spread of the centres) shrinks 1e12-fold
            mid = (a + b) / 2
            cdf = (special.stdtr(df, (mid[:, None, :] - c0[None]) / scale) * ok[None]).sum(axis=1)
            below = cdf < q[:, None] * n_ok[None, :]
            a, b = np.where(below, mid, a), np.where(below, b, mid)
        out[:, start:start + chunk] = np.where(n_ok[None, :] > 0, (a + b) / 2, np.nan)
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
