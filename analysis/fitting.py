"""Fit a scaling law to a table: multi-start, bootstrap, hold-out, diagnostics.

Method (FITTING.md): log-space residuals, summed Huber loss with a named ``delta``, the full
Cartesian start grid of the law, every start optimised and the best kept; tolerances that never
decide the answer; percentile intervals from a bootstrap by cluster (by run: several checkpoints of
one run resample together); a hold-out fit without the largest-compute group.

The optimisation of a start runs as a short continuation on ``delta`` (``stage_factors``: a few
iterations at ``1000 delta``, ``100 delta``, ``10 delta``) and then to convergence at ``delta``
itself. The continuation only moves the *starting point* of the final optimisation, whose objective
is exactly the requested one; it saves the many Newton iterations a near-L1 objective costs from a
far start. Bootstrap resamples start from the full-data optimum (and the next best distinct local
optima), directly at ``delta``.
"""

from __future__ import annotations

import json
import math
import types
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from analysis.derived import DerivedContext, derived_quantities
from analysis.errors import AnalysisError
from analysis.laws import Law, get_law
from analysis.objective import make_objective
from analysis.optimize import BatchResult, minimize_batched

__all__ = [
    "DEFAULT_COLUMNS",
    "Diagnostics",
    "FitOptions",
    "FitResult",
    "Holdout",
    "HoldoutResult",
    "Provenance",
    "fit",
    "percentile_interval",
    "prepare_points",
]

#: Where the law variables live in a frame loaded by :func:`analysis.load_runs` (TRACKING.md).
DEFAULT_COLUMNS: Mapping[str, str] = types.MappingProxyType({
    "N": "derived.n_params_active",
    "D": "final/tokens",
    "C": "final/flops",
    "V": "derived.virtual_width",
    "E": "model.pool_size",
})
DEFAULT_LOSS = "final/val_loss"
RESULT_SCHEMA = 1


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """How the optimiser runs. ``engine="scipy"`` loops scipy L-BFGS-B over the starts instead
    (slow; the reference of ``moue bench fit``); ``scipy_tolerances="default"`` reproduces the
    default-tolerance pitfall of FITTING.md and exists so that tests can show it fails."""

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
    (a factor 1.26) of the largest compute.
    """

    column: str | None = None
    min_value: float | None = None


@dataclass(frozen=True, kw_only=True)
class HoldoutResult:
    """Hold-out evaluation; errors are in loss units, ``mape`` in percent."""

    column: str
    min_value: float
    n_train: int
    n_test: int
    rmse: float
    max_abs_error: float
    mape: float
    extrapolation_ratio: float  # largest held-out compute / largest training compute
    params: Mapping[str, float]  # natural parameters of the training fit
    test_loss: tuple[float, ...]
    test_pred: tuple[float, ...]
    test_axis: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class Diagnostics:
    """Convergence record of the multi-start fit (and its bootstrap)."""

    objective: float
    grad_norm: float  # max |projected gradient| at the optimum
    status: str  # optimiser status of the best start
    n_starts: int
    n_converged: int  # starts that ended converged or stalled (not max_iter)
    n_best_basin: int  # starts that ended at the best optimum (f within 1e-7, params within 1e-4)
    on_bound: tuple[str, ...]  # natural names of parameters sitting on a bound
    n_bootstrap_unconverged: int = 0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """What was fitted: rows, the filter, corpus, counting convention, source."""

    n_points: int
    n_clusters: int
    cluster_column: str | None
    clusters: tuple[str, ...]  # sorted cluster keys (run ids): pairing key of the gate
    filter: str = ""
    corpus_fingerprint: str | None = None
    counting_convention: str | None = None
    source: str = ""


def _ro(mapping: Mapping) -> Mapping:
    return types.MappingProxyType(dict(mapping))


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """A fitted law: named (natural) parameters, percentile intervals, derived quantities,
    bootstrap samples, diagnostics, hold-out evaluation and provenance.

    ``theta`` is the optimum in the law's fitted parametrisation (logs of coefficients);
    ``bootstrap`` the natural parameters of every resample, shape (B, P), in ``law.natural``
    order; ``bootstrap_derived`` likewise for ``derived`` (columns in ``derived`` order).
    """

    law: str
    loss: str
    variables: Mapping[str, str]
    delta: float
    theta: tuple[float, ...]
    params: Mapping[str, float]
    ci: Mapping[str, tuple[float, float]]
    derived: Mapping[str, float]
    derived_ci: Mapping[str, tuple[float, float]]
    context: DerivedContext
    level: float
    n_bootstrap: int
    seed: int
    bootstrap: np.ndarray = field(repr=False)
    bootstrap_derived: np.ndarray = field(repr=False)
    diagnostics: Diagnostics
    holdout: HoldoutResult | None
    provenance: Provenance

    def __post_init__(self) -> None:
        for name in ("variables", "params", "ci", "derived", "derived_ci"):
            object.__setattr__(self, name, _ro(getattr(self, name)))
        for name in ("bootstrap", "bootstrap_derived"):
            arr = np.array(getattr(self, name), dtype=np.float64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def law_spec(self) -> Law:
        return get_law(self.law)

    def sd(self, name: str) -> float:
        """Bootstrap standard deviation of a natural parameter."""
        j = self.law_spec.natural.index(name)
        return float(np.std(self.bootstrap[:, j], ddof=1))

    def predict(self, data: Mapping[str, np.ndarray], *, samples: bool = False) -> np.ndarray:
        """Predicted loss at ``data`` (law variable -> values); with ``samples=True`` one row per
        bootstrap resample (B, n) instead of the point estimate (n,)."""
        law = self.law_spec
        if samples:
            nat = self.bootstrap
            theta = _natural_to_theta(law, nat)
            return law.predict_loss(theta, data)
        return law.predict_loss(np.asarray(self.theta)[None, :], data)[0]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``params``, ``ci``, ``derived``, ``diagnostics``, ``holdout``..."""

        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
            if isinstance(x, Mapping):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        d = {
            "schema": RESULT_SCHEMA,
            "law": self.law,
            "formula": self.law_spec.formula,
            "loss": self.loss,
            "variables": dict(self.variables),
            "delta": self.delta,
            "theta": list(self.theta),
            "params": dict(self.params),
            "ci": {k: list(v) for k, v in self.ci.items()},
            "sd": {k: self.sd(k) for k in self.params} if self.n_bootstrap > 1 else {},
            "derived": dict(self.derived),
            "derived_ci": {k: list(v) for k, v in self.derived_ci.items()},
            "context": asdict(self.context),
            "level": self.level,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "diagnostics": asdict(self.diagnostics),
            "holdout": None if self.holdout is None else {
                **asdict(self.holdout), "params": dict(self.holdout.params)},
            "provenance": asdict(self.provenance),
            "bootstrap": {"params": self.bootstrap.tolist(),
                          "derived": self.bootstrap_derived.tolist(),
                          "derived_names": list(self.derived)},
        }
        return clean(d)

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitResult:
        if d.get("schema") != RESULT_SCHEMA:
            raise AnalysisError("fit result schema", d.get("schema"),
                                f"is not supported (this version reads {RESULT_SCHEMA})")

        def num(x):
            return {"inf": math.inf, "-inf": -math.inf, None: math.nan}.get(x, x) \
                if not isinstance(x, (int, float)) else float(x)

        ho = d.get("holdout")
        ctx = d["context"]
        return cls(
            law=d["law"], loss=d["loss"], variables=d["variables"], delta=float(d["delta"]),
            theta=tuple(float(v) for v in d["theta"]),
            params={k: num(v) for k, v in d["params"].items()},
            ci={k: (num(v[0]), num(v[1])) for k, v in d["ci"].items()},
            derived={k: num(v) for k, v in d["derived"].items()},
            derived_ci={k: (num(v[0]), num(v[1])) for k, v in d["derived_ci"].items()},
            context=DerivedContext(
                target_compute=ctx.get("target_compute"), n_ref=ctx.get("n_ref"),
                v_range=None if ctx.get("v_range") is None else tuple(ctx["v_range"])),
            level=float(d["level"]), n_bootstrap=int(d["n_bootstrap"]), seed=int(d["seed"]),
            # explicit row counts: a law with no derived quantities has (B, 0) samples, which
            # reshape(-1, 0) cannot infer
            bootstrap=np.array([[num(v) for v in row] for row in d["bootstrap"]["params"]],
                               dtype=np.float64).reshape(len(d["bootstrap"]["params"]), len(d["params"])),
            bootstrap_derived=np.array(
                [[num(v) for v in row] for row in d["bootstrap"]["derived"]],
                dtype=np.float64).reshape(len(d["bootstrap"]["derived"]), len(d["derived"])),
            diagnostics=Diagnostics(**{**d["diagnostics"],
                                       "on_bound": tuple(d["diagnostics"]["on_bound"]),
                                       "warnings": tuple(d["diagnostics"]["warnings"])}),
            holdout=None if ho is None else HoldoutResult(**{
                **ho, "params": {k: num(v) for k, v in ho["params"].items()},
                "test_loss": tuple(ho["test_loss"]), "test_pred": tuple(ho["test_pred"]),
                "test_axis": tuple(ho["test_axis"])}),
            provenance=Provenance(**{**d["provenance"],
                                     "clusters": tuple(d["provenance"]["clusters"])}),
        )

    @classmethod
    def from_json(cls, text: str) -> FitResult:
        return cls.from_dict(json.loads(text))


def _natural_to_theta(law: Law, nat: np.ndarray) -> np.ndarray:
    """Inverse of ``law.to_natural`` (numerically: logs where the law fits logs)."""
    nat = np.atleast_2d(np.asarray(nat, dtype=np.float64))
    theta = nat.copy()
    if law.name == "clark":
        theta[:, 4] = np.log(nat[:, 4])
        theta[:, 5] = np.log(nat[:, 5]) - np.log(nat[:, 4])
        return theta
    logs = np.asarray(law.model.log_params)
    theta[:, logs] = np.log(nat[:, logs])
    return theta


# ----------------------------------------------------------------------------- data preparation


@dataclass(frozen=True, kw_only=True)
class _Points:
    data: Mapping[str, np.ndarray]  # law variable -> values
    loss: np.ndarray
    weights: np.ndarray
    cluster_index: np.ndarray
    clusters: tuple[str, ...]
    compute: np.ndarray  # the hold-out / extrapolation axis
    compute_column: str


def _column(frame, name: str) -> np.ndarray | None:
    if hasattr(frame, "get_column"):  # polars
        if name not in frame.columns:
            return None
        return frame.get_column(name).to_numpy()
    if name not in frame:
        return None
    return np.asarray(frame[name])


def _columns(frame) -> list[str]:
    return list(frame.columns) if hasattr(frame, "columns") else list(frame)


def _unique_nonnull(values: np.ndarray | None) -> list:
    if values is None:
        return []
    return sorted({str(v) for v in values.tolist() if v is not None})


def prepare_points(frame, *, law: Law, loss: str, variables: Mapping[str, str],
                   weights: str | None = None, cluster: str | None = None) -> _Points:
    """Validate and extract what a fit of ``law`` needs from ``frame`` (polars or a mapping).

    Refuses (``AnalysisError``): missing columns, non-finite or non-positive values, fewer points
    than parameters + 2, an axis with a single value, mixed corpora or counting conventions.
    """
    cols = _columns(frame)
    n_rows = frame.height if hasattr(frame, "height") else (
        len(frame[cols[0]]) if cols else 0)
    if n_rows < law.n_params + 2:
        raise AnalysisError("points", n_rows, f"are too few: law {law.name} has {law.n_params} "
                            f"parameters and needs at least {law.n_params + 2} points")
    data = {}
    for var in law.variables:
        col = variables.get(var)
        if col is None:
            raise AnalysisError(f"variables.{var}", None,
                                f"is required by law {law.name} ({', '.join(law.variables)})")
        values = _column(frame, col)
        if values is None:
            raise AnalysisError(f"variables.{var}", col,
                                f"is not a column; columns: {', '.join(cols)}")
        data[var] = _positive(values, f"variables.{var}", col)
    lvalues = _column(frame, loss)
    if lvalues is None:
        raise AnalysisError("loss", loss, f"is not a column; columns: {', '.join(cols)}")
    lvalues = _positive(lvalues, "loss", loss)
    n = lvalues.shape[0]
    if n < law.n_params + 2:
        raise AnalysisError("points", n, f"are too few: law {law.name} has {law.n_params} "
                            f"parameters and needs at least {law.n_params + 2} points")
    for var, values in data.items():
        if np.unique(values).size < 2:
            raise AnalysisError(f"variables.{var}", variables[var],
                                f"has a single value ({values[0]:g}); the law needs it to vary")
    for col, what in (("corpus_fingerprint", "corpora"), ("data.corpus", "corpora"),
                      ("count.convention", "counting conventions")):
        found = _unique_nonnull(_column(frame, col))
        if len(found) > 1:
            raise AnalysisError(col, found, f"mixes {what}; fit one at a time (filter the runs)")
    if weights is None:
        w = np.ones(n)
    else:
        wv = _column(frame, weights)
        if wv is None:
            raise AnalysisError("weights", weights, f"is not a column; columns: {', '.join(cols)}")
        w = np.asarray(wv, dtype=np.float64)
        if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
            raise AnalysisError("weights", weights, "must be finite, >= 0 and not all zero")
    if cluster is None and "run_id" in cols:
        cluster = "run_id"
    if cluster is None:  # every row its own cluster, in row order
        clusters, cluster_index = np.array([str(i) for i in range(n)]), np.arange(n)
    else:
        kv = _column(frame, cluster)
        if kv is None:
            raise AnalysisError("cluster", cluster, f"is not a column; columns: {', '.join(cols)}")
        keys = np.array([str(v) for v in kv.tolist()])
        clusters, cluster_index = np.unique(keys, return_inverse=True)
    if "C" in data:
        compute, compute_column = data["C"], variables["C"]
    elif (fl := _column(frame, "final/flops")) is not None and np.all(np.isfinite(
            np.asarray(fl, dtype=float))):
        compute, compute_column = np.asarray(fl, dtype=np.float64), "final/flops"
    elif "N" in data and "D" in data:
        compute, compute_column = 6.0 * data["N"] * data["D"], "6ND"
    else:
        var = law.variables[0]
        compute, compute_column = data[var], variables[var]
    return _Points(data=data, loss=lvalues, weights=w, cluster_index=cluster_index,
                   clusters=tuple(str(c) for c in clusters), compute=compute,
                   compute_column=compute_column)


def _positive(values, field_name: str, col: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnalysisError(field_name, col, "must be a numeric column") from None
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        raise AnalysisError(field_name, col, f"has {int(bad.sum())} missing, non-finite or "
                            f"non-positive values (first at row {int(np.flatnonzero(bad)[0])}); "
                            "filter them out first")
    return arr


# ----------------------------------------------------------------------------- optimisation


def _optimize(law: Law, prep, y: np.ndarray, weights: np.ndarray, delta: float,
              starts: np.ndarray, options: FitOptions, *, continuation: bool) -> BatchResult:
    """Optimise every start (rows of ``starts``); ``weights`` (n,) or one row per start."""
    scale = delta * float(np.mean(weights.sum(axis=-1)))
    gtol = options.gtol_rel * scale
    if options.engine == "scipy":
        return _optimize_scipy(law, prep, y, weights, delta, starts, options, gtol)
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


def _optimize_scipy(law, prep, y, weights, delta, starts, options, gtol) -> BatchResult:
    """Reference: one scipy L-BFGS-B call per start (``tight``: ftol=0, pgtol=gtol)."""
    from scipy.optimize import minimize

    fgh = make_objective(law, prep, y, weights, delta, hessian=False)
    bounds = list(zip(law.lower, law.upper))
    if options.scipy_tolerances == "tight":
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


def _on_bound(law: Law, theta: np.ndarray) -> tuple[str, ...]:
    span = law.upper - law.lower
    hit = (theta <= law.lower + 1e-9 * span) | (theta >= law.upper - 1e-9 * span)
    return tuple(name for name, h in zip(law.natural, hit) if h)


# ----------------------------------------------------------------------------- public entry


def fit(
    frame,
    *,
    law: str,
    loss: str = DEFAULT_LOSS,
    variables: Mapping[str, str] | None = None,
    delta: float = 1e-3,
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
    ``n_bootstrap >= 1000`` for reported intervals, ``0`` to skip the bootstrap; ``holdout=None``
    skips the hold-out fit. ``context`` fixes where derived quantities are evaluated (default: a
    target compute 10x the largest ``6 N D`` in the data, the observed V range, the largest N).
    ``starts`` replaces the law's start grid (rows of fitted parameters, ``law.params`` order).
    """
    spec = get_law(law)
    if not delta > 0:
        raise AnalysisError("delta", delta, "must be > 0")
    if n_bootstrap < 0:
        raise AnalysisError("n_bootstrap", n_bootstrap, "must be >= 0")
    if not 0 < level < 1:
        raise AnalysisError("level", level, "must be in (0, 1)")
    variables = dict(variables) if variables is not None else {
        v: DEFAULT_COLUMNS[v] for v in spec.variables if v in DEFAULT_COLUMNS}
    pts = prepare_points(frame, law=spec, loss=loss, variables=variables, weights=weights,
                         cluster=cluster)
    notes: list[str] = []
    if 0 < n_bootstrap < 1000:
        notes.append(f"n_bootstrap={n_bootstrap} < 1000: intervals are rough")

    prep = spec.prepare(pts.data)
    y = spec.target(pts.loss)
    if starts is None:
        starts = spec.start_grid()
    else:
        starts = np.atleast_2d(np.asarray(starts, dtype=np.float64))
        if starts.shape[1] != spec.n_params:
            raise AnalysisError("starts", starts.shape, f"must have {spec.n_params} columns "
                                f"({', '.join(spec.params)})")
    res = _optimize(spec, prep, y, pts.weights, delta, starts, options, continuation=True)
    b, basin = _best_basin(spec, res)
    theta = res.x[b]
    nat = spec.to_natural(theta)[0]
    on_bound = _on_bound(spec, theta)
    if on_bound:
        notes.append(f"optimum on a bound: {', '.join(on_bound)}")
    if res.status[b] == "max_iter":
        notes.append("best start hit the iteration limit")

    ctx = context or _default_context(spec, pts)
    boot = np.empty((0, spec.n_params))
    unconverged = 0
    if n_bootstrap > 0:
        boot, unconverged = _bootstrap(spec, prep, y, pts, delta, res, n_bootstrap, seed, options)
        if unconverged:
            notes.append(f"{unconverged} bootstrap resamples hit the iteration limit")
    nat_names = spec.natural
    point_derived = derived_quantities(spec.name, {k: np.array([v]) for k, v in
                                                   zip(nat_names, nat)}, ctx)
    derived_names = list(point_derived)
    if boot.shape[0]:
        boot_d = derived_quantities(spec.name, {k: boot[:, j] for j, k in enumerate(nat_names)},
                                    ctx)
        boot_derived = np.stack([boot_d[k] for k in derived_names], axis=1) if derived_names \
            else np.empty((boot.shape[0], 0))
    else:
        boot_derived = np.empty((0, len(derived_names)))
    ci = {}
    dci = {}
    if boot.shape[0] > 1:
        lo, hi = percentile_interval(boot, level)
        ci = {k: (float(lo[j]), float(hi[j])) for j, k in enumerate(nat_names)}
        if derived_names:
            dlo, dhi = percentile_interval(boot_derived, level)
            dci = {k: (float(dlo[j]), float(dhi[j])) for j, k in enumerate(derived_names)}

    ho = None
    if holdout is not None:
        ho = _holdout(spec, frame, pts, holdout, delta, options)
        if isinstance(ho, str):
            notes.append(ho)
            ho = None

    diagnostics = Diagnostics(
        objective=float(res.f[b]),
        grad_norm=float(res.pg_norm[b]),
        status=str(res.status[b]),
        n_starts=int(starts.shape[0]),
        n_converged=int(np.sum(res.status != "max_iter")),
        n_best_basin=int(basin.sum()),
        on_bound=on_bound,
        n_bootstrap_unconverged=unconverged,
        warnings=tuple(notes),
    )
    for note in notes:
        warnings.warn(f"fit {spec.name}: {note}", stacklevel=2)
    return FitResult(
        law=spec.name,
        loss=loss,
        variables=variables,
        delta=delta,
        theta=tuple(float(v) for v in theta),
        params={k: float(v) for k, v in zip(nat_names, nat)},
        ci=ci,
        derived={k: float(v[0]) for k, v in point_derived.items()},
        derived_ci=dci,
        context=ctx,
        level=level,
        n_bootstrap=int(boot.shape[0]),
        seed=seed,
        bootstrap=boot,
        bootstrap_derived=boot_derived,
        diagnostics=diagnostics,
        holdout=ho,
        provenance=Provenance(
            n_points=int(pts.loss.shape[0]),
            n_clusters=len(pts.clusters),
            cluster_column=cluster if cluster is not None else (
                "run_id" if "run_id" in _columns(frame) else None),
            clusters=pts.clusters,
            filter=filter_desc,
            corpus_fingerprint=_single(frame, "corpus_fingerprint"),
            counting_convention=_single(frame, "count.convention"),
            source=source,
        ),
    )


def percentile_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` percentile interval of each column of ``samples`` (B, Q), ignoring NaN.

    Columns with infinite samples (e.g. ``n_cutoff`` when V never stops helping) use the
    inverted-CDF definition, since interpolating between infinities is undefined.
    """
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    samples = np.atleast_2d(samples)
    lo, hi = np.empty(samples.shape[1]), np.empty(samples.shape[1])
    for j in range(samples.shape[1]):
        col = samples[:, j]
        col = col[~np.isnan(col)]
        if col.size == 0:
            lo[j] = hi[j] = np.nan
            continue
        method = "linear" if np.all(np.isfinite(col)) else "inverted_cdf"
        lo[j], hi[j] = np.quantile(col, q, method=method)
    return lo, hi


def _single(frame, col: str) -> str | None:
    found = _unique_nonnull(_column(frame, col))
    return found[0] if found else None


def _default_context(law: Law, pts: _Points) -> DerivedContext:
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


def _bootstrap(law, prep, y, pts, delta, res, n_bootstrap, seed, options):
    W = resample_weights(pts.cluster_index, len(pts.clusters), n_bootstrap, seed)
    W *= pts.weights[None, :]
    x0 = _distinct_optima(law, res, options.bootstrap_starts)
    K = x0.shape[0]
    starts = np.repeat(x0[None, :, :], n_bootstrap, axis=0).reshape(n_bootstrap * K, -1)
    Wk = np.repeat(W, K, axis=0)  # problem i uses resample i // K
    out = _optimize(law, prep, y, Wk, delta, starts, options, continuation=False)
    f = out.f.reshape(n_bootstrap, K)
    best = np.argmin(np.where(np.isfinite(f), f, np.inf), axis=1)
    pick = np.arange(n_bootstrap) * K + best
    unconverged = int(np.sum(out.status[pick] == "max_iter"))
    return law.to_natural(out.x[pick]), unconverged


def _holdout(law: Law, frame, pts: _Points, spec: Holdout, delta: float,
             options: FitOptions) -> HoldoutResult | str:
    if spec.column is None:
        axis, column = pts.compute, pts.compute_column
    else:
        v = _column(frame, spec.column)
        if v is None:
            raise AnalysisError("holdout.column", spec.column, "is not a column")
        axis, column = np.asarray(v, dtype=np.float64), spec.column
    threshold = spec.min_value
    if threshold is None:
        threshold = float(np.max(axis)) / 10**0.1
    test = axis >= threshold
    n_train = int((~test).sum())
    if test.sum() == 0 or n_train < law.n_params + 2:
        return (f"hold-out skipped: {int(test.sum())} held-out and {n_train} training points "
                f"(needs >= 1 and >= {law.n_params + 2})")
    train_data = {k: v[~test] for k, v in pts.data.items()}
    if any(np.unique(v).size < 2 for v in train_data.values()):
        return "hold-out skipped: an axis has a single value in the training rows"
    prep = law.prepare(train_data)
    y = law.target(pts.loss[~test])
    res = _optimize(law, prep, y, pts.weights[~test], delta, law.start_grid(), options,
                    continuation=True)
    b, _ = _best_basin(law, res)
    pred = law.predict_loss(res.x[b][None, :], {k: v[test] for k, v in pts.data.items()})[0]
    obs = pts.loss[test]
    err = pred - obs
    return HoldoutResult(
        column=column,
        min_value=float(threshold),
        n_train=n_train,
        n_test=int(test.sum()),
        rmse=float(np.sqrt(np.mean(err**2))),
        max_abs_error=float(np.max(np.abs(err))),
        mape=float(100.0 * np.mean(np.abs(err) / obs)),
        extrapolation_ratio=float(np.max(axis[test]) / np.max(axis[~test])),
        params={k: float(v) for k, v in zip(law.natural, law.to_natural(res.x[b])[0])},
        test_loss=tuple(float(v) for v in obs),
        test_pred=tuple(float(v) for v in pred),
        test_axis=tuple(float(v) for v in axis[test]),
    )
