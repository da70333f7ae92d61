"""Does the virtual-width term help? Likelihood-ratio test and AIC/BIC against the nested law.

Likelihood (``likelihood="huber"``): the Huber density with threshold ``delta`` and a fitted scale
``sigma``, ``p(r) = exp(-huber_delta(r) / sigma^2) / Z(sigma)`` with
``Z = sigma sqrt(2 pi) (2 Phi(delta/sigma) - 1) + 2 sigma^2/delta exp(-delta^2 / (2 sigma^2))``:
Gaussian inside ``|r| <= delta``, Laplace tails beyond. For any ``sigma`` its maximum-likelihood
law parameters are exactly the Huber fit, so the fit and the likelihood agree; ``sigma`` is then
maximised in one dimension. ``likelihood="gaussian"`` uses ``N(0, sigma^2)`` at the Huber optimum
with ``sigma^2 = mean r^2`` (an approximation, offered for comparison). Parameter counts include
``sigma``; ``LR = 2 (l_full - l_nested)`` is referred to chi-squared with the difference of
parameter counts (asymptotic; conservative when the nested law sits on the boundary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moue.analysis.errors import AnalysisError
from moue.analysis.fitting import DEFAULT_LOSS, FitOptions, fit
from moue.analysis.laws import get_law
from moue.analysis.objective import huber
from moue.analysis.points import prepare_points
from moue.analysis.result import FitResult

__all__ = ["NestedTest", "huber_loglik", "likelihood_ratio_test"]


@dataclass(frozen=True, kw_only=True)
class NestedTest:
    """Result of testing ``law`` against ``nested`` on the same points."""

    law: str
    nested: str
    likelihood: str
    n_points: int
    loglik: float
    loglik_nested: float
    lr_stat: float
    df: int
    p_value: float
    aic: float
    aic_nested: float
    bic: float
    bic_nested: float
    notes: tuple[str, ...] = ()  # the notes of the fits this test made (none when given fits)

    @property
    def prefers_law(self) -> bool:
        """True when the test rejects the nested law at 5% and AIC agrees."""
        return self.p_value < 0.05 and self.aic < self.aic_nested


def huber_loglik(r: np.ndarray, delta: float, weights: np.ndarray | None = None) -> float:
    """Maximised (over ``sigma``) log-likelihood of residuals ``r`` under the Huber density."""
    from scipy.optimize import minimize_scalar
    from scipy.special import ndtr

    w = np.ones_like(r) if weights is None else weights
    S = float(np.sum(w * huber(r, delta)))
    n = float(np.sum(w))

    def negll(log_sigma: float) -> float:
        s = math.exp(log_sigma)
        z = (s * math.sqrt(2 * math.pi) * (2 * ndtr(delta / s) - 1)
             + 2 * s * s / delta * math.exp(-delta * delta / (2 * s * s)))
        return S / (s * s) + n * math.log(z)

    rms = math.sqrt(max(float(np.sum(w * r * r)) / n, 1e-300))
    lo, hi = math.log(max(rms, delta) * 1e-3), math.log(max(rms, delta) * 1e3)
    res = minimize_scalar(negll, bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-10, "maxiter": 500})
    return -float(res.fun)


def _gaussian_loglik(r, weights):
    n = float(np.sum(weights))
    s2 = float(np.sum(weights * r * r)) / n
    return -0.5 * n * (math.log(2 * math.pi * s2) + 1.0)


def _loglik(result: FitResult, frame, likelihood: str, weights_col, cluster) -> tuple[float, int]:
    law = result.law_spec
    pts = prepare_points(frame, law=law, loss=result.loss, variables=result.variables,
                         weights=weights_col, cluster=cluster)
    r = law.target(pts.loss) - law.predict(np.asarray(result.theta)[None, :], pts.data)[0]
    if likelihood == "huber":
        return huber_loglik(r, result.delta, pts.weights), pts.loss.shape[0]
    return _gaussian_loglik(r, pts.weights), pts.loss.shape[0]


def likelihood_ratio_test(
    frame,
    *,
    law: str,
    nested: str | None = None,
    loss: str = DEFAULT_LOSS,
    variables: dict[str, str] | None = None,
    delta: float = 1e-3,
    weights: str | None = None,
    likelihood: str = "huber",
    fits: tuple[FitResult, FitResult] | None = None,
    options: FitOptions = FitOptions(),
) -> NestedTest:
    """Test ``law`` (a virtual-width law) against ``nested`` (default: the law's own nested law)
    on the same rows. ``fits`` reuses existing point fits (law, nested) instead of refitting; the
    notes of the fits made here are the test's ``notes``."""
    spec = get_law(law)
    nested = nested or spec.nested
    if nested is None:
        raise AnalysisError("nested", None, f"is needed: law {law} declares no nested law")
    nspec = get_law(nested)
    if not set(nspec.variables) <= set(spec.variables):
        raise AnalysisError("nested", nested, f"must use a subset of {law}'s variables")
    if likelihood not in ("huber", "gaussian"):
        raise AnalysisError("likelihood", likelihood, "must be 'huber' or 'gaussian'")
    if fits is None:
        common = dict(loss=loss, delta=delta, weights=weights, n_bootstrap=0, holdout=None,
                      options=options)
        full = fit(frame, law=law, variables=variables, **common)
        small = fit(frame, law=nested, variables=nspec.select(full.variables), **common)
        notes = full.notes + small.notes
    else:
        full, small = fits
        notes = ()
    if full.delta != small.delta or full.loss != small.loss:
        raise AnalysisError("fits", (full.law, small.law), "must share loss column and delta")
    ll, n = _loglik(full, frame, likelihood, weights, None)
    ll0, _ = _loglik(small, frame, likelihood, weights, None)
    k, k0 = spec.n_params + 1, nspec.n_params + 1
    df = k - k0
    lr = max(0.0, 2.0 * (ll - ll0))
    from scipy.stats import chi2

    return NestedTest(
        law=law, nested=nested, likelihood=likelihood, n_points=n, loglik=ll, loglik_nested=ll0,
        lr_stat=lr, df=df, p_value=float(chi2.sf(lr, df)),
        aic=2 * k - 2 * ll, aic_nested=2 * k0 - 2 * ll0,
        bic=k * math.log(n) - 2 * ll, bic_nested=k0 * math.log(n) - 2 * ll0, notes=notes,
    )
