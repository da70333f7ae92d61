"""Group-sequential boundaries and repeated confidence intervals for a study that looks at its data
after every round and may stop when its 95% interval decides.

Stopping the first time a naive 95% interval excludes 0 tests at 5% once per look: over 5 looks
the chance of a false positive is 14% (Armitage, McPherson & Rowe 1969). Here the 5% is *spent*
over the looks instead (Lan & DeMets 1983, Biometrika 70:659-663): at information fraction ``t``
(the share of the planned information, e.g. runs or pairs, seen so far) the looks so far may
together have rejected a true null with probability at most ``alpha(t)``, by the
O'Brien-Fleming-type spending function (:func:`obf_spending`). It spends almost nothing early and
nearly all of ``alpha`` at the end, so the final look's boundary is close to 1.96. Because only
the fractions seen so far enter, the looks need not be planned: the boundary of look ``k`` depends
on ``t_1..t_k`` alone (Jennison & Turnbull 2000, "Group Sequential Methods with Applications to
Clinical Trials", ch. 7), and a look at ``t >= 1`` spends the rest.

The two-sided test spends ``alpha / 2`` on each side, each by the one-sided O'Brien-Fleming-type
function ``2 - 2 Phi(z_{1-alpha/4} / sqrt(t))``, so ``alpha(t) = 4 - 4 Phi(z_{1-alpha/4} / sqrt(t))``.
This is the convention of ldbounds (Reboussin, DeMets, Kim & Lan 2000, Controlled Clinical Trials
21:190-207) and of gsDesign's ``sfLDOF`` at one-sided ``alpha / 2``, which give the published
boundaries 4.877, 3.357, 2.680, 2.290, 2.031 for 5 equal looks at 5%. Pitfall: the form
``2 - 2 Phi(z_{1-alpha/2} / sqrt(t))`` with ``alpha`` the two-sided total is another, less
cautious function (first boundary ``z_{1-alpha/2} / sqrt(t_1)``: 4.383, 3.100, 2.553, 2.254, 2.064
for those looks); both spend ``alpha`` by ``t = 1``.

Look ``k``'s two-sided z boundary ``c_k`` solves, under the null,
``P(|Z_j| < c_j for j < k, |Z_k| >= c_k) = alpha(t_k) - alpha(t_{k-1})`` with ``Z_k = S_k / sqrt(t_k)``
and ``S`` a Brownian motion in information time (``S_k ~ N(0, t_k)``, independent increments).
:func:`boundaries` computes it by recursive numerical integration (Armitage, McPherson & Rowe
1969, JRSS A 132:235-244; Jennison & Turnbull 2000, ch. 19): the sub-density of ``S_{k-1}`` on the
continuation region ``|s| < c_{k-1} sqrt(t_{k-1})`` is held as Simpson-weighted masses on a uniform
grid, the crossing probability at look ``k`` is a sum of normal tails over it (exact in ``c``, so
``scipy.optimize.brentq`` solves for ``c_k``), and the next sub-density is its convolution with the
``N(0, t_k - t_{k-1})`` increment. The grid is laid out only when the next increment is known, with
spacing 1/16 of the smaller of the two increments' standard deviations (so the sharp kernel of
closely spaced looks is resolved; at most 8,001 points, reached only for increments below ~1e-4 of
the information), over the whole continuation region (cutting it at 9 sd of ``S`` would lose the
far tail that sets the boundaries of very early looks). Against a grid 4x finer the boundaries move
by < 1e-7, and they reproduce ldbounds's published values (4 decimals) to 2e-4
(tests/analysis/test_sequential.py).

The **repeated confidence interval** (RCI) at look ``k`` is ``estimate +/- c_k se`` (Jennison &
Turnbull 1989, JRSS B 51:305-361; 2000, ch. 9): the intervals of all looks cover the truth
simultaneously with probability ``1 - alpha``, so a study may stop at any look where its interval
decides and still report that interval with its nominal coverage. For a t statistic (a variance
estimated from few runs) the boundary is carried across by tail probability (Jennison & Turnbull
2000, section 11.4): :func:`t_to_z` maps ``t`` to the z with the same tail, and :func:`rci` widens
a t-based interval with the t quantile whose tail is that of ``c_k``. That carry-over is an
approximation (the looks' t statistics share their variance estimates): with 3 to 20 runs per look
its simultaneous coverage was 0.944-0.950 in simulation, where the z interval on the estimated
standard error covered only 0.88-0.90 (tests/analysis/test_sequential.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats

from moue.analysis.errors import AnalysisError

__all__ = ["MAX_BOUNDARY", "obf_spending", "boundaries", "boundary", "t_to_z", "rci"]

MAX_BOUNDARY = 40.0  # the boundary of a look that may spend ~0 alpha (an early look under OBF spending)
_STEPS_PER_SD = 16  # grid points per sd of the sharper of two successive increments (J&T 2000, ch. 19)
_MAX_HALF_STEPS = 4000  # grid intervals per half of the continuation region, at most
_CHUNK = 2_000_000  # kernel entries evaluated at once (16 MB)


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise AnalysisError("alpha", alpha, "must lie in (0, 1)")
    return float(alpha)


def obf_spending(t, alpha: float = 0.05):
    """The two-sided alpha spent by information fraction ``t`` under O'Brien-Fleming-type spending
    (Lan & DeMets 1983; Jennison & Turnbull 2000, section 7.2), ``alpha / 2`` per side as in
    ldbounds and gsDesign: ``alpha(t) = 4 - 4 Phi(z_{1-alpha/4} / sqrt(t))`` for ``t`` in (0, 1],
    ``alpha`` for ``t >= 1`` and 0 at ``t = 0``. Computed as ``4 Phi(-x)`` so the tiny values of
    early looks keep their precision. A float for a scalar ``t``, else an array."""
    alpha = _check_alpha(alpha)
    t_arr = np.asarray(t, dtype=float)
    if np.any(np.isnan(t_arr)) or np.any(t_arr < 0):
        raise AnalysisError("t", t, "must be information fractions >= 0")
    z = special.ndtri(1 - alpha / 4)
    with np.errstate(divide="ignore"):
        spent = 4 * special.ndtr(-z / np.sqrt(np.minimum(t_arr, 1.0)))
    spent = np.where(t_arr >= 1.0, alpha, spent)
    return float(spent) if spent.ndim == 0 else spent


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    """The fractions as an array, capped at 1; errors name what was wrong."""
    t = np.asarray(fractions, dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise AnalysisError("fractions", fractions, "must be a non-empty sequence of information fractions")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise AnalysisError("fractions", fractions, "must be finite and > 0")
    if np.any(np.diff(t) <= 0):
        raise AnalysisError("fractions", fractions, "must be strictly increasing (one look per fraction)")
    if np.any(t[:-1] >= 1.0):
        raise AnalysisError("fractions", fractions, "may reach 1 only at the last look (a look at t >= 1 spends "
                            "all of alpha; no look can follow it)")
    return np.minimum(t, 1.0)


def _crossing(c: float, t: float, u: np.ndarray, mass: np.ndarray, var: float) -> float:
    """``P(|S_k| >= c sqrt(t))`` and no earlier crossing, with the sub-distribution of ``S_{k-1}``
    on its continuation region as point masses ``mass`` at ``u`` and ``S_k - S_{k-1} ~ N(0, var)``."""
    b, sd = c * np.sqrt(t), np.sqrt(var)
    return float(mass @ (special.ndtr((-b - u) / sd) + special.ndtr((u - b) / sd)))


def _simpson_grid(half_width: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """An odd number of equally spaced points on ``[-half_width, half_width]`` (spacing <= ``step``
    unless that needs more than ``_MAX_HALF_STEPS`` per half; at least 50 per half) and their
    composite Simpson weights."""
    n = int(np.clip(np.ceil(half_width / step), 50, _MAX_HALF_STEPS))
    x = np.linspace(-half_width, half_width, 2 * n + 1)
    w = np.ones_like(x)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return x, w * (x[1] - x[0]) / 3.0


def _density(x: np.ndarray, u: np.ndarray, mass: np.ndarray, var: float) -> np.ndarray:
    """The density at ``x`` of ``S_k = S_{k-1} + N(0, var)`` on the paths that continued past look
    ``k-1`` (point masses ``mass`` at ``u``), in row chunks to bound memory."""
    out = np.empty_like(x)
    rows = max(1, _CHUNK // u.size)
    for i in range(0, x.size, rows):
        d = x[i:i + rows, None] - u[None, :]
        out[i:i + rows] = np.exp(-d * d / (2 * var)) @ mass
    return out / np.sqrt(2 * np.pi * var)


def _solve(spend: float, t: float, u: np.ndarray, mass: np.ndarray, var: float) -> float:
    """The boundary whose crossing probability at this look is ``spend`` (brentq on ``c``)."""
    if spend <= _crossing(MAX_BOUNDARY, t, u, mass, var):
        return MAX_BOUNDARY
    return optimize.brentq(lambda c: _crossing(c, t, u, mass, var) - spend, 0.0, MAX_BOUNDARY,
                           xtol=1e-10, rtol=1e-12)


def boundaries(fractions: Sequence[float], alpha: float = 0.05) -> np.ndarray:
    """Two-sided symmetric z boundaries ``c_1..c_K`` for looks at increasing information fractions,
    by O'Brien-Fleming-type alpha spending (:func:`obf_spending`; Lan & DeMets 1983) and recursive
    numerical integration (Armitage, McPherson & Rowe 1969; Jennison & Turnbull 2000, ch. 19):
    look ``k`` rejects when ``|Z_k| >= c_k``. Fractions above 1 count as 1, and a look at 1 spends
    all that is left; a look whose alpha increment is ~0 gets ``MAX_BOUNDARY``. ``c_k`` depends
    only on ``fractions[:k]``."""
    alpha = _check_alpha(alpha)
    t = _check_fractions(fractions)
    increments = np.diff(obf_spending(t, alpha), prepend=0.0)
    u, mass = np.zeros(1), np.ones(1)  # S_0 = 0: all paths continue
    t_prev, var_prev, b_prev = 0.0, None, None
    out = np.empty(t.size)
    for k, (t_k, spend) in enumerate(zip(t, increments)):
        var = t_k - t_prev
        if k > 0:  # lay out S_{k-1}'s sub-density now that this look's increment is known
            x, w = _simpson_grid(b_prev, np.sqrt(min(var_prev, var)) / _STEPS_PER_SD)
            u, mass = x, w * _density(x, u, mass, var_prev)
        out[k] = _solve(spend, t_k, u, mass, var)
        t_prev, var_prev, b_prev = t_k, var, out[k] * np.sqrt(t_k)
    return out


def boundary(previous: Sequence[float], t: float, alpha: float = 0.05) -> float:
    """The z boundary of a new look at fraction ``t`` after looks at the ``previous`` fractions
    (``boundaries([*previous, t], alpha)[-1]``)."""
    return float(boundaries([*previous, t], alpha)[-1])


def t_to_z(t_stat, df):
    """The z with the same tail probability as ``t_stat`` under Student's t with ``df`` degrees of
    freedom, ``Phi^{-1}(F_t(t; df))`` (Jennison & Turnbull 2000, section 11.4); ``t_stat`` itself
    where ``df`` is infinite. Computed on the upper tail of ``|t|`` to keep large statistics exact.
    Vectorised; a float for scalar input."""
    t_arr, df_arr = np.broadcast_arrays(np.asarray(t_stat, dtype=float), np.asarray(df, dtype=float))
    if np.any(~(df_arr > 0)):
        raise AnalysisError("df", df, "must be > 0 (np.inf for a z statistic)")
    finite = np.where(np.isinf(df_arr), 1.0, df_arr)
    z = np.sign(t_arr) * stats.norm.isf(stats.t.sf(np.abs(t_arr), finite))
    z = np.where(np.isinf(df_arr), t_arr, z)
    return float(z) if z.ndim == 0 else z


def rci(estimate, se, c: float, df: float = np.inf):
    """The repeated confidence interval ``estimate +/- q se`` at a look with z boundary ``c``
    (Jennison & Turnbull 1989; 2000, ch. 9): ``q = c`` for a z statistic (``df`` infinite), else the
    t quantile with the tail of ``c``, ``F_t^{-1}(Phi(c); df)`` (J&T 2000, section 11.4), so a
    t-based interval is widened consistently. ``c = MAX_BOUNDARY`` with finite ``df`` gives an
    infinite interval (the look spends no alpha: it cannot decide). ``(low, high)``: floats for
    scalar ``estimate`` and ``se``, arrays for arrays (many studies at one look)."""
    if not c > 0:
        raise AnalysisError("c", c, "must be a z boundary > 0")
    if not df > 0:
        raise AnalysisError("df", df, "must be > 0 (np.inf for a z statistic)")
    est, se_arr = np.broadcast_arrays(np.asarray(estimate, dtype=float), np.asarray(se, dtype=float))
    if np.any(~(se_arr >= 0)):
        raise AnalysisError("se", se, "must be >= 0")
    q = float(c) if np.isinf(df) else float(stats.t.isf(stats.norm.sf(c), df))
    low, high = est - q * se_arr, est + q * se_arr
    return (float(low), float(high)) if low.ndim == 0 else (low, high)
