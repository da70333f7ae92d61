"""Fit a scaling law to a table: multi-start, bootstrap, hold-out, diagnostics.

Method (docs/FITTING.md): log-space residuals, summed Huber loss with a named ``delta``, the full
Cartesian start grid of the law, every start optimised and the best kept; tolerances that never
decide the answer; percentile intervals from a bootstrap by cluster (by run: several checkpoints of
one run resample together); a hold-out fit without the largest-compute group.

:func:`fit` is six public stages, each usable alone (``moue bench fit`` times two of them):
:func:`prepare` (validate the table, extract the points: a :class:`Problem`) ->
:func:`fit_point` (every start optimised, the best kept: a :class:`PointFit`) ->
:func:`fit_bootstrap` (refits on resampled clusters: :class:`BootstrapSamples`) ->
:func:`fit_noise` (the residuals' scatter and, along each law variable, the law's errors when it
extrapolates within the data: the :class:`~moue.analysis.predict.Noise` of prediction intervals) ->
:func:`fit_holdout` (fit without the largest-compute group, predict it with prediction intervals: a
:class:`HoldoutFit`) ->
:func:`assemble` (derived quantities, intervals, diagnostics, provenance: the
:class:`~moue.analysis.result.FitResult`). The stages' notes (rough intervals, an optimum on a bound,
unconverged resamples, a skipped hold-out) end up in ``FitResult.diagnostics.warnings`` only.

The optimisation of a start runs as a short continuation on ``delta`` (``stage_factors``: a few
iterations at ``1000 delta``, ``100 delta``, ``10 delta``) and then to convergence at ``delta``
itself. The continuation only moves the *starting point* of the final optimisation, whose objective
is exactly the requested one; it saves the many Newton iterations a near-L1 objective costs from a
far start. Bootstrap resamples start from the full-data optimum (and the next best distinct local
optima), directly at ``delta``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from moue.analysis.derived import DerivedContext
from moue.analysis.errors import AnalysisError
from moue.analysis.laws import Law, get_law
from moue.analysis.objective import make_objective
from moue.analysis.optimize import BatchResult, minimize_batched
from moue.analysis.points import Points, column_values, prepare_points
from moue.analysis.predict import (FOLD_BOOTSTRAP, Direction, Noise, direction_values, extrapolation_directions,
                                   extrapolation_folds, prediction_interval)
from moue.analysis.result import Diagnostics, FitResult, HoldoutResult, Provenance, percentile_interval

__all__ = [
    "DEFAULT_COLUMNS",
    "DEFAULT_LOSS",
    "BootstrapSamples",
    "FitOptions",
    "Holdout",
    "HoldoutFit",
    "PointFit",
    "Problem",
    "assemble",
    "fit",
    "fit_bootstrap",
    "fit_holdout",
    "fit_noise",
    "fit_point",
    "prepare",
    "resample_weights",
]

#: Where the law variables live in a frame loaded by :func:`moue.analysis.load_runs` (docs/TRACKING.md).
DEFAULT_COLUMNS: Mapping[str, str] = types.MappingProxyType({
    "N": "derived.n_params_active",
    "D": "final/tokens",
    "C": "final/flops",
    "V": "derived.virtual_width",
    "E": "model.pool_size",
})
DEFAULT_LOSS = "final/val_loss"


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """How the optimiser runs. ``engine="scipy"`` loops scipy L-BFGS-B over the starts instead
    (slow; the reference of ``moue bench fit``); ``scipy_tolerances="default"`` reproduces the
    default-tolerance pitfall of docs/FITTING.md and exists so that tests can show it fails."""

    engine: str = "newton"
    gtol_rel: float = 1e-8  # converged when max|projected gradient| <= gtol_rel * delta * sum(w)
    max_iter: int = 500
    stage_factors: tuple[float, ...] = (1000.0, 100.0, 10.0)
    stage_max_iter: int = 20
    bootstrap_starts: int = 4  # full-data optima (distinct basins) each resample starts from
    scipy_tolerances: str = "tight"

    def __post_init__(self) -> None:
        if self.engine not in ("newton", "scipy"):
            raise AnalysisError("engine", self.engine, "must be 'newton' or 'scipy'")
        if self.scipy_tolerances not in ("tight", "default"):
            raise AnalysisError("scipy_tolerances", self.scipy_tolerances,
                                "must be 'tight' or 'default'")
        if not self.gtol_rel > 0:
            raise AnalysisError("gtol_rel", self.gtol_rel, "must be > 0")
        if self.bootstrap_starts < 1:
            raise AnalysisError("bootstrap_starts", self.bootstrap_starts, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Holdout:
    """Hold out the rows whose ``column`` is ``>= min_value`` (fit on the rest, predict them).

    ``column=None`` means the compute axis of the fit (the ``C`` variable, else ``final/flops``,
    else ``6 N D``). ``min_value=None`` means the largest-compute group: rows within ``0.1`` dex
    (a factor 1.26) of the largest compute, extended down the axis until it holds at least
    ``min_count`` rows (ties at the threshold included); the result says how many it held out.
    """

    column: str | None = None
    min_value: float | None = None
    min_count: int = 3


# ----------------------------------------------------------------------------- stage 1: prepare


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A prepared fit: the law, its points, the Huber objective's inputs and the optimiser's
    options. ``prep`` (the law's precomputed features) and ``y`` (the response it predicts) follow
    from the law and the points."""

    law: Law
    loss: str  # the loss column
    variables: Mapping[str, str]  # law variable -> column
    points: Points
    delta: float
    options: FitOptions = FitOptions()
    prep: object = field(init=False, repr=False, compare=False)
    y: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise AnalysisError("delta", self.delta, "must be > 0")
        object.__setattr__(self, "prep", self.law.prepare(self.points.data))
        object.__setattr__(self, "y", self.law.target(self.points.loss))


def prepare(frame, *, law: Law | str, loss: str = DEFAULT_LOSS,
            variables: Mapping[str, str] | None = None, delta: float | None = None,
            weights: str | None = None, cluster: str | None = None,
            options: FitOptions = FitOptions()) -> Problem:
    """Stage 1 of :func:`fit`: validate ``frame`` (a polars DataFrame or a mapping of columns)
    and extract the points a fit of ``law`` needs (see :func:`prepare_points` for what is refused).

    ``variables`` maps each law variable to a column (default: :data:`DEFAULT_COLUMNS`);
    ``weights`` names a per-row weight column, ``cluster`` the column whose rows resample together
    (default ``run_id`` when present, else each row).
    """
    spec = get_law(law) if isinstance(law, str) else law
    delta = spec.delta if delta is None else delta  # the law's own, in its residual's units
    if not delta > 0:
        raise AnalysisError("delta", delta, "must be > 0")
    variables = dict(variables) if variables is not None else {
        v: DEFAULT_COLUMNS[v] for v in spec.variables if v in DEFAULT_COLUMNS}
    points = prepare_points(frame, law=spec, loss=loss, variables=variables, weights=weights,
                            cluster=cluster)
    return Problem(law=spec, loss=loss, variables=variables, points=points, delta=delta,
                   options=options)


# ----------------------------------------------------------------------------- optimisation


def _optimize(problem: Problem, weights: np.ndarray, starts: np.ndarray, *,
              continuation: bool) -> BatchResult:
    """Optimise every start (rows of ``starts``); ``weights`` (n,) or one row per start."""
    law, prep, y, delta, options = (problem.law, problem.prep, problem.y, problem.delta,
                                    problem.options)
    scale = delta * float(np.mean(weights.sum(axis=-1)))
    gtol = options.gtol_rel * scale
    if options.engine == "scipy":
        return _optimize_scipy(problem, weights, starts, gtol)
    x = starts
    evals = 0
    if continuation:
        for factor in options.stage_factors:
            fgh = make_objective(law, prep, y, weights, delta * factor)
            res = minimize_batched(fgh, x, lower=law.lower, upper=law.upper,
                                   gtol=gtol * factor * 1e4, max_iter=options.stage_max_iter)
            x, evals = res.x, evals + res.n_evals
    fgh = make_objective(law, prep, y, weights, delta)
    res = minimize_batched(fgh, x, lower=law.lower, upper=law.upper, gtol=gtol,
                           max_iter=options.max_iter)
    return BatchResult(x=res.x, f=res.f, pg_norm=res.pg_norm, n_iter=res.n_iter,
                       status=res.status, n_evals=evals + res.n_evals)


def _optimize_scipy(problem: Problem, weights, starts, gtol) -> BatchResult:
    """Reference: one scipy L-BFGS-B call per start (``tight``: ftol=0, pgtol=gtol)."""
    from scipy.optimize import minimize

    law = problem.law
    fgh = make_objective(law, problem.prep, problem.y, weights, problem.delta, hessian=False)
    bounds = list(zip(law.lower, law.upper))
    if problem.options.scipy_tolerances == "tight":
        opts = {"ftol": 0.0, "gtol": gtol, "maxiter": 15000, "maxfun": 15000}
    else:
        opts = {}
    S, P = starts.shape
    x = np.empty((S, P))
    f = np.empty(S)
    pg = np.empty(S)
    n_iter = np.zeros(S, dtype=np.int64)
    status = np.empty(S, dtype=object)
    evals = 0
    for s in range(S):
        idx = np.array([s])

        def fun(theta, idx=idx):
            fs, gs, _ = fgh(theta[None, :], idx)
            return float(fs[0]), gs[0]

        r = minimize(fun, starts[s], jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
        x[s], f[s], n_iter[s], evals = r.x, r.fun, r.nit, evals + r.nfev
        _, g, _ = fgh(r.x[None, :], idx)
        fixed = ((r.x <= law.lower) & (g[0] > 0)) | ((r.x >= law.upper) & (g[0] < 0))
        pg[s] = np.abs(np.where(fixed, 0.0, g[0])).max()
        status[s] = "converged" if r.success else "max_iter"
    return BatchResult(x=x, f=f, pg_norm=pg, n_iter=n_iter, status=status.astype(str),
                       n_evals=evals)


# ----------------------------------------------------------------------------- stage 2: point fit


@dataclass(frozen=True, kw_only=True)
class PointFit:
    """Every start optimised (``optima``, indexed like the starts), the best one and the mask of
    the starts that ended in its basin."""

    optima: BatchResult
    best: int
    basin: np.ndarray
    on_bound: tuple[str, ...]  # natural names of the parameters on a bound at the best optimum

    @property
    def theta(self) -> np.ndarray:
        """The optimum in the law's fitted parametrisation, (P,)."""
        return self.optima.x[self.best]

    @property
    def objective(self) -> float:
        return float(self.optima.f[self.best])

    @property
    def notes(self) -> tuple[str, ...]:
        notes = []
        if self.on_bound:
            notes.append(f"optimum on a bound: {', '.join(self.on_bound)}")
        if self.optima.status[self.best] == "max_iter":
            notes.append("best start hit the iteration limit")
        return tuple(notes)


def fit_point(problem: Problem, *, starts: np.ndarray | None = None) -> PointFit:
    """Stage 2 of :func:`fit`: optimise every start (default: the law's full start grid; else
    rows of fitted parameters in ``law.params`` order), each with the continuation on ``delta``,
    and keep the best."""
    law = problem.law
    if starts is None:
        starts = law.start_grid()
    else:
        starts = np.atleast_2d(np.asarray(starts, dtype=np.float64))
        if starts.shape[1] != law.n_params:
            raise AnalysisError("starts", starts.shape, f"must have {law.n_params} columns "
                                f"({', '.join(law.params)})")
    res = _optimize(problem, problem.points.weights, starts, continuation=True)
    b, basin = _best_basin(law, res)
    return PointFit(optima=res, best=b, basin=basin, on_bound=_on_bound(law, res.x[b]))


def _best_basin(law: Law, res: BatchResult) -> tuple[int, np.ndarray]:
    """Index of the best start and a mask of the starts that ended in its basin."""
    finite = np.isfinite(res.f)
    if not finite.any():
        raise AnalysisError("fit", "all starts", "produced non-finite objectives")
    b = int(np.nanargmin(np.where(finite, res.f, np.inf)))
    nat = law.to_natural(res.x)
    close_f = np.abs(res.f - res.f[b]) <= 1e-7 * abs(res.f[b]) + 1e-300
    close_x = np.all(np.abs(nat - nat[b]) <= 1e-4 * (1.0 + np.abs(nat[b])), axis=1)
    return b, close_f & close_x


def _on_bound(law: Law, theta: np.ndarray) -> tuple[str, ...]:
    span = law.upper - law.lower
    hit = (theta <= law.lower + 1e-9 * span) | (theta >= law.upper - 1e-9 * span)
    return tuple(name for name, h in zip(law.natural, hit) if h)


# ----------------------------------------------------------------------------- stage 3: bootstrap


@dataclass(frozen=True, kw_only=True)
class BootstrapSamples:
    """Natural parameters of every resample's refit, (B, P) in ``law.natural`` order."""

    natural: np.ndarray
    n_unconverged: int = 0  # resamples whose refit hit the iteration limit
    n_on_bound: int = 0  # resamples whose refit ended with a parameter on a bound

    @property
    def notes(self) -> tuple[str, ...]:
        notes = []
        if self.n_unconverged:
            notes.append(f"{self.n_unconverged} bootstrap resamples hit the iteration limit")
        if self.n_on_bound:
            notes.append(f"{self.n_on_bound} of {self.natural.shape[0]} bootstrap resamples ended with a "
                         "parameter on a bound")
        return tuple(notes)


def resample_weights(cluster_index: np.ndarray, n_clusters: int, n_bootstrap: int,
                     seed: int) -> np.ndarray:
    """Bootstrap multiplicity of every row, (B, n): clusters drawn with replacement, seeded.

    Resample ``b`` depends only on ``seed``, the number of clusters and their sorted keys, so two
    fits of the same runs share their resamples (the paired bootstrap of the regression gate).
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_bootstrap, n_clusters))
    flat = draws + n_clusters * np.arange(n_bootstrap)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_bootstrap * n_clusters)
    counts = counts.reshape(n_bootstrap, n_clusters).astype(np.float64)
    return counts[:, cluster_index]


def _distinct_optima(law: Law, res: BatchResult, k: int) -> np.ndarray:
    """Up to ``k`` best optima that differ from each other and are competitive (objective within
    10% of the best): the starts of every bootstrap resample."""
    order = np.argsort(np.where(np.isfinite(res.f), res.f, np.inf))
    chosen: list[np.ndarray] = []
    for i in order:
        if len(chosen) >= k or res.f[i] > 1.1 * res.f[order[0]]:
            break
        if any(np.all(np.abs(res.x[i] - c) <= 1e-3 * (1.0 + np.abs(c))) for c in chosen):
            continue
        chosen.append(res.x[i])
    return np.array(chosen)


def fit_bootstrap(problem: Problem, point: PointFit, *, n_bootstrap: int,
                  seed: int = 0) -> BootstrapSamples:
    """Stage 3 of :func:`fit`: refit ``n_bootstrap`` resamples of the clusters (seeded, see
    :func:`resample_weights`), each from the best distinct optima of ``point`` at ``delta``
    directly, and keep each resample's best refit. ``n_bootstrap=0`` returns no samples."""
    law, pts = problem.law, problem.points
    if n_bootstrap < 0:
        raise AnalysisError("n_bootstrap", n_bootstrap, "must be >= 0")
    if n_bootstrap == 0:
        return BootstrapSamples(natural=np.empty((0, law.n_params)))
    W = resample_weights(pts.cluster_index, len(pts.clusters), n_bootstrap, seed)
    W *= pts.weights[None, :]
    x0 = _distinct_optima(law, point.optima, problem.options.bootstrap_starts)
    theta, status = _refit(problem, x0, W)
    return BootstrapSamples(natural=law.to_natural(theta),
                            n_unconverged=int(np.sum(status == "max_iter")),
                            n_on_bound=int(sum(bool(_on_bound(law, t)) for t in theta)))


def _refit(problem: Problem, x0: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refit the law with each row of weights ``W`` (R, n), every row from each start in ``x0``
    (K, P) at ``delta`` directly; the best refit of each row (R, P) and its status (R,)."""
    R, K = W.shape[0], x0.shape[0]
    starts = np.repeat(x0[None, :, :], R, axis=0).reshape(R * K, -1)
    Wk = np.repeat(W, K, axis=0)  # problem i uses row i // K
    out = _optimize(problem, Wk, starts, continuation=False)
    f = out.f.reshape(R, K)
    best = np.argmin(np.where(np.isfinite(f), f, np.inf), axis=1)
    pick = np.arange(R) * K + best
    return out.x[pick], out.status[pick]


# ----------------------------------------------------------------------------- stage 3b: noise


def fit_noise(problem: Problem, point: PointFit, *, n_bootstrap: int = 100, seed: int = 0) -> Noise:
    """Stage 3b of :func:`fit`: the run-to-run noise of prediction intervals
    (``moue.analysis.predict``, which states the method): the residuals' scatter at the optimum and,
    for each direction of :func:`~moue.analysis.predict.extrapolation_directions`, the range of the
    data along it and the law's misfit when it extrapolates that way. For each fold of
    :func:`~moue.analysis.predict.extrapolation_folds` along a direction the law is refitted on the
    points below the cut (warm-started from the optimum, as a bootstrap resample), and that refit is
    bootstrapped (``n_bootstrap`` resamples of the fold's clusters, ``seed`` plus the fold's number)
    for its own parameter uncertainty at the points above the cut. ``n_bootstrap=0`` gives the
    residuals' scatter and the ranges only. Folds with fewer than ``P + 2`` points below the cut, or
    a law variable with a single value there, are left out, and so are those whose refit hits the
    iteration limit (not bootstrapped)."""
    law, pts = problem.law, problem.points
    if n_bootstrap < 0:
        raise AnalysisError("n_bootstrap", n_bootstrap, "must be >= 0")
    used = pts.weights > 0
    resid = (problem.y - law.predict(point.theta[None, :], pts.data)[0])[used]
    df = int(resid.size - law.n_params)
    sd = float(np.sqrt(np.sum(resid**2) / df))
    axes = {name: direction_values(pts.data, name) for name in extrapolation_directions(law.variables)}
    folds = [(name, m & used) for name, v in axes.items()
             for m in (extrapolation_folds(v) if n_bootstrap >= 2 else [])]
    folds = [(name, m) for name, m in folds if m.sum() >= law.n_params + 2 and (used & ~m).any()
             and all(np.unique(v[m]).size >= 2 for v in pts.data.values())]
    x0 = _distinct_optima(law, point.optima, problem.options.bootstrap_starts)
    refits, status = _refit(problem, x0, np.stack([pts.weights * m for _, m in folds])) if folds else ([], [])
    sq = {name: [] for name in axes}
    var = {name: [] for name in axes}
    for i, ((name, m), refit, st) in enumerate(zip(folds, refits, status)):
        if st == "max_iter":
            continue  # the refit's errors would be the optimiser's, not the law's
        e2, v_j = _fold_errors(problem, refit, x0, m, used & ~m, n_bootstrap=n_bootstrap, seed=seed + i)
        sq[name].append(e2)
        var[name].append(v_j)
    directions = {}
    for name, v in axes.items():
        e2 = np.concatenate(sq[name]) if sq[name] else np.empty(0)
        excess = float(np.mean(e2 - np.concatenate(var[name]))) - sd**2 if e2.size else 0.0
        misfit = float(np.sqrt(max(0.0, excess)))
        directions[name] = Direction(lo=float(v[used].min()), hi=float(v[used].max()), misfit_sd=misfit,
                                     n_folds=len(sq[name]), n_errors=int(e2.size))
    e2 = np.concatenate([e for name in axes for e in sq[name]] or [np.empty(0)])
    return Noise(residual_sd=sd, residual_df=df, misfit_sd=max(d.misfit_sd for d in directions.values()),
                 extrapolation_rms=float(np.sqrt(np.mean(e2))) if e2.size else float("nan"),
                 n_folds=sum(d.n_folds for d in directions.values()), n_errors=int(e2.size),
                 directions=directions)


def _fold_errors(problem: Problem, refit: np.ndarray, x0: np.ndarray, below: np.ndarray, above: np.ndarray,
                 *, n_bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One extrapolation fold: ``refit``, the law refitted on the rows ``below``, predicts the rows
    ``above``; their squared errors and the variance of that prediction over ``n_bootstrap``
    resamples of the refit (the clusters of the rows below, ``seed``; each resample from ``refit`` and
    the full-data optimum ``x0[0]``)."""
    law, pts = problem.law, problem.points
    keys, index = np.unique(pts.cluster_index[below], return_inverse=True)
    W = np.zeros((n_bootstrap, pts.loss.size))
    W[:, below] = resample_weights(index, keys.size, n_bootstrap, seed) * pts.weights[below]
    theta, _ = _refit(problem, np.vstack([refit, x0[:1]]), W)
    data = {k: v[above] for k, v in pts.data.items()}
    err = problem.y[above] - law.predict(refit[None, :], data)[0]
    return err**2, np.var(law.predict(theta, data), axis=0, ddof=1)


# ----------------------------------------------------------------------------- stage 4: hold-out


@dataclass(frozen=True, kw_only=True)
class HoldoutFit:
    """The hold-out evaluation, or ``None`` with a note saying why it was skipped."""

    result: HoldoutResult | None
    notes: tuple[str, ...] = ()


def fit_holdout(problem: Problem, spec: Holdout = Holdout(), *, frame=None, n_bootstrap: int = 0,
                seed: int = 0, level: float = 0.95) -> HoldoutFit:
    """Stage 4 of :func:`fit`: fit the law (full start grid) on the rows below the hold-out
    threshold and predict the rest, with prediction intervals at ``level`` from that fit's own
    bootstrap (``n_bootstrap`` resamples, ``seed``: pass the main fit's) and noise (:func:`fit_noise`
    on the training rows); with fewer than 2 resamples there are no intervals (``test_lo``,
    ``test_hi`` empty, ``coverage`` NaN). ``frame`` is needed only when ``spec.column`` names a
    column other than the fit's compute axis. Skipped, with a note, when too few rows remain on
    either side or an axis of the training rows has a single value."""
    law, pts = problem.law, problem.points
    if spec.column is None:
        axis, column = pts.compute, pts.compute_column
    else:
        v = None if frame is None else column_values(frame, spec.column)
        if v is None:
            raise AnalysisError("holdout.column", spec.column, "is not a column")
        axis, column = np.asarray(v, dtype=np.float64), spec.column
    threshold = spec.min_value
    if threshold is None:
        threshold = float(np.max(axis)) / 10**0.1
        if (axis >= threshold).sum() < spec.min_count and axis.size > spec.min_count:
            threshold = float(np.sort(axis)[::-1][spec.min_count - 1])  # the min_count largest (and ties)
    test = axis >= threshold
    n_train = int((~test).sum())
    if test.sum() == 0 or n_train < law.n_params + 2:
        return HoldoutFit(result=None, notes=(
            f"hold-out skipped: {int(test.sum())} held-out and {n_train} training points "
            f"(needs >= 1 and >= {law.n_params + 2})",))
    train = pts.subset(~test)
    if any(np.unique(v).size < 2 for v in train.data.values()):
        return HoldoutFit(result=None, notes=(
            "hold-out skipped: an axis has a single value in the training rows",))
    train_problem = dataclasses.replace(problem, points=train)
    point = fit_point(train_problem)
    held = {k: v[test] for k, v in pts.data.items()}
    pred = law.predict_loss(point.theta[None, :], held)[0]
    obs = pts.loss[test]
    err = pred - obs
    lo = hi = ()
    coverage = float("nan")
    if n_bootstrap >= 2:
        samples = fit_bootstrap(train_problem, point, n_bootstrap=n_bootstrap, seed=seed)
        noise = fit_noise(train_problem, point, n_bootstrap=min(n_bootstrap, FOLD_BOOTSTRAP), seed=seed)
        p = prediction_interval(law, point.theta, samples.natural, noise, held, level=level)
        lo, hi = tuple(float(v) for v in p.lo), tuple(float(v) for v in p.hi)
        coverage = float(np.mean((obs >= p.lo) & (obs <= p.hi)))
    return HoldoutFit(result=HoldoutResult(
        column=column,
        min_value=float(threshold),
        n_train=n_train,
        n_test=int(test.sum()),
        rmse=float(np.sqrt(np.mean(err**2))),
        max_abs_error=float(np.max(np.abs(err))),
        mape=float(100.0 * np.mean(np.abs(err) / obs)),
        extrapolation_ratio=float(np.max(axis[test]) / np.max(axis[~test])),
        params={k: float(v) for k, v in zip(law.natural, law.to_natural(point.theta)[0])},
        test_loss=tuple(float(v) for v in obs),
        test_pred=tuple(float(v) for v in pred),
        test_axis=tuple(float(v) for v in axis[test]),
        test_lo=lo,
        test_hi=hi,
        coverage=coverage,
    ))


# ----------------------------------------------------------------------------- stage 5: assemble


def _default_context(pts: Points) -> DerivedContext:
    target = None
    if "N" in pts.data and "D" in pts.data:
        target = 10.0 * float(np.max(6.0 * pts.data["N"] * pts.data["D"]))
    elif "C" in pts.data:
        target = 10.0 * float(np.max(pts.data["C"]))
    v_range = None
    if "V" in pts.data:
        v_range = (float(pts.data["V"].min()), float(pts.data["V"].max()))
    n_ref = float(pts.data["N"].max()) if "N" in pts.data else None
    return DerivedContext(target_compute=target, n_ref=n_ref, v_range=v_range)


def _derived(law: Law, nat: np.ndarray, samples: np.ndarray,
             ctx: DerivedContext) -> tuple[dict[str, float], np.ndarray]:
    """The law's derived quantities at the optimum ``nat`` (1, P), and per resample (B, Q)."""
    point = {k: float(v[0]) for k, v in law.derived_quantities(law.by_name(nat), ctx).items()}
    if not samples.shape[0] or not point:
        return point, np.empty((samples.shape[0], len(point)))
    per_sample = law.derived_quantities(law.by_name(samples), ctx)
    return point, np.stack([per_sample[k] for k in point], axis=1)


def _intervals(names, samples: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals by name (none without at least two samples or any name)."""
    if samples.shape[0] < 2 or not names:
        return {}
    lo, hi = percentile_interval(samples, level)
    return {k: (float(lo[j]), float(hi[j])) for j, k in enumerate(names)}


def assemble(problem: Problem, point: PointFit, samples: BootstrapSamples,
             holdout: HoldoutFit | None = None, *, noise: Noise | None = None, level: float = 0.95,
             seed: int = 0, context: DerivedContext | None = None, filter_desc: str = "",
             source: str = "") -> FitResult:
    """Stage 5 of :func:`fit`: the :class:`FitResult` of the stages before: natural parameters,
    derived quantities (at ``context``, default from the data: see :func:`fit`), percentile
    intervals at ``level``, diagnostics with every stage's notes, provenance, and ``noise`` (from
    :func:`fit_noise`; without it the result makes no prediction intervals). ``seed`` is the one
    the bootstrap used (the gate pairs resamples by it)."""
    if not 0 < level < 1:
        raise AnalysisError("level", level, "must be in (0, 1)")
    law, pts, res = problem.law, problem.points, point.optima
    nat = law.to_natural(point.theta)
    ctx = context or _default_context(pts)
    derived, boot_derived = _derived(law, nat, samples.natural, ctx)
    n_boot = samples.natural.shape[0]
    rough = (f"n_bootstrap={n_boot} < 1000: intervals are rough",) if 0 < n_boot < 1000 else ()
    notes = rough + point.notes + samples.notes + (() if holdout is None else holdout.notes)
    diagnostics = Diagnostics(
        objective=point.objective,
        grad_norm=float(res.pg_norm[point.best]),
        status=str(res.status[point.best]),
        n_starts=int(res.x.shape[0]),
        n_converged=int(np.sum(res.status != "max_iter")),
        n_best_basin=int(point.basin.sum()),
        on_bound=point.on_bound,
        n_bootstrap_unconverged=samples.n_unconverged,
        warnings=notes,
        n_bootstrap_on_bound=samples.n_on_bound,
    )
    return FitResult(
        law=law.name, loss=problem.loss, variables=problem.variables, delta=problem.delta,
        theta=tuple(float(v) for v in point.theta),
        params={k: float(v) for k, v in zip(law.natural, nat[0])},
        ci=_intervals(law.natural, samples.natural, level),
        derived=derived, derived_ci=_intervals(list(derived), boot_derived, level),
        context=ctx, level=level, n_bootstrap=int(n_boot), seed=seed,
        bootstrap=samples.natural, bootstrap_derived=boot_derived,
        diagnostics=diagnostics, holdout=None if holdout is None else holdout.result, noise=noise,
        provenance=Provenance(
            n_points=int(pts.loss.shape[0]), n_clusters=len(pts.clusters),
            cluster_column=pts.cluster_column, clusters=pts.clusters, filter=filter_desc,
            corpus_fingerprint=pts.corpus_fingerprint,
            counting_convention=pts.counting_convention, source=source,
            levels={k: int(np.unique(v).size) for k, v in pts.data.items()}),
    )


# ----------------------------------------------------------------------------- public entry


def fit(
    frame,
    *,
    law: str,
    loss: str = DEFAULT_LOSS,
    variables: Mapping[str, str] | None = None,
    delta: float | None = None,
    weights: str | None = None,
    cluster: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    holdout: Holdout | None = Holdout(),
    context: DerivedContext | None = None,
    filter_desc: str = "",
    source: str = "",
    starts: np.ndarray | None = None,
    options: FitOptions = FitOptions(),
) -> FitResult:
    """Fit ``law`` to the rows of ``frame`` (a polars DataFrame or a mapping of columns).

    ``variables`` maps each law variable (``N``, ``D``, ``C``, ``V``, ``E``) to a column; by default
    the moue tracking columns of :data:`DEFAULT_COLUMNS`. ``cluster`` is the column whose values
    resample together in the bootstrap (default ``run_id`` when present, else each row). Use
    ``n_bootstrap >= 1000`` for reported intervals, ``0`` to skip the bootstrap (and with it every
    prediction interval); ``holdout=None`` skips the hold-out fit, which is bootstrapped like the
    main fit for its prediction intervals. ``context`` fixes where derived quantities are evaluated
    (default: a target compute 10x the largest ``6 N D`` in the data, the observed V range, the
    largest N).
    ``starts`` replaces the law's start grid (rows of fitted parameters, ``law.params`` order).
    The fit's notes are in ``diagnostics.warnings`` (nothing is warned).
    """
    spec = get_law(law)
    delta = spec.delta if delta is None else delta  # the law's own, in its residual's units
    if not delta > 0:
        raise AnalysisError("delta", delta, "must be > 0")
    if n_bootstrap < 0:
        raise AnalysisError("n_bootstrap", n_bootstrap, "must be >= 0")
    if not 0 < level < 1:
        raise AnalysisError("level", level, "must be in (0, 1)")
    problem = prepare(frame, law=spec, loss=loss, variables=variables, delta=delta,
                      weights=weights, cluster=cluster, options=options)
    point = fit_point(problem, starts=starts)
    samples = fit_bootstrap(problem, point, n_bootstrap=n_bootstrap, seed=seed)
    held = None if holdout is None else fit_holdout(problem, holdout, frame=frame, n_bootstrap=n_bootstrap,
                                                     seed=seed, level=level)
    noise = fit_noise(problem, point, n_bootstrap=min(n_bootstrap, FOLD_BOOTSTRAP), seed=seed)
    return assemble(problem, point, samples, held, noise=noise, level=level, seed=seed, context=context,
                    filter_desc=filter_desc, source=source)
