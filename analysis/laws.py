"""The registry of scaling laws. Each law is one unit, declared in one block below: its variables,
fitted and reported parameters and the transform between them, bounds, start grid, prediction, the
quantities derived from it, the exponents the regression gate watches and its nested law without
the virtual-width term.

Conventions (docs/FITTING.md):

- Every law predicts the *log* of the loss, and residuals are taken there: ``r = log L - pred``
  (natural log; ``clark`` uses log10 as published).
- Positive coefficients are fitted as their logs (``e = log E``, ``a = log A``); the reported
  (``natural``) parameters are ``E = exp(e)`` and so on. Exponents are fitted as they are.
- Sums of power laws are evaluated as a LogSumExp of terms that are linear in the fitted
  parameters (``log(A / N^alpha) = a - alpha log N``), which is exact and overflow-free
  (:mod:`moue.analysis.models`).
- ``N`` = active non-embedding parameters, ``D`` = training tokens, ``C`` = training compute
  (FLOPs), ``V`` = virtual width, ``E`` = number of experts (``clark``, ``joint_moe``).

Each :class:`Law` evaluates many parameter vectors at once: ``theta`` has shape ``(S, P)``
(S starts or bootstrap resamples), the data ``n`` points; predictions are ``(S, n)``. Derived
quantities take the natural parameters by name, each an array over resamples
(:mod:`moue.analysis.derived` has the formulas they share).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from moue.analysis.derived import (
    ComputeOptimal,
    DerivedContext,
    allocation_exponents,
    compute_optimal,
    cutoff,
    optimum_over_v,
    v_grid,
)
from moue.analysis.errors import AnalysisError
from moue.analysis.models import Data, LSEModel, term_features, weighted_gram

__all__ = ["LAWS", "Law", "get_law"]

#: Natural parameters by name, each an array over resamples (or broadcastable against a grid).
Params = Mapping[str, np.ndarray]


def _no_derived(p: Params, ctx: DerivedContext) -> dict[str, np.ndarray]:
    return {}


@dataclass(frozen=True, kw_only=True)
class Law:
    """A scaling law: what it needs, what it fits, where to start, how to predict, what follows.

    ``params`` are the fitted (log-space where noted) names, ``natural`` the reported names in the
    same order; ``model`` evaluates the law and converts between the two. ``bounds`` and ``grid``
    are per fitted parameter; the start grid is their Cartesian product. ``exponents`` (natural
    names) are what the regression gate watches. ``nested`` names the same law without its
    virtual-width term (for the likelihood-ratio test). ``derive`` computes the law's derived
    quantities from its natural parameters by name; ``optimum``, for laws of N and D alone, the
    compute-optimal allocation at a compute budget (the report's frontier).
    """

    name: str
    formula: str
    variables: tuple[str, ...]
    params: tuple[str, ...]
    natural: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...]
    grid: tuple[tuple[float, ...], ...]
    exponents: tuple[str, ...]
    log10: bool = False
    # Huber delta in the units of the law's residual (ln L, or log10 L for log10 laws), used when a
    # fit names none: Hoffmann et al.'s 1e-3 for ln-residual laws; 1e-2 for ``clark`` (log10), about
    # 3x its typical residual on Clark et al.'s data (sd 0.003), so typical points are fitted by
    # least squares and only outliers are down-weighted (1e-3 there acts as least absolute deviations
    # and extrapolated up to 22% worse on RL-R; tests/analysis/test_reference_fits.py)
    delta: float = 1e-3
    nested: str | None = None
    reference: str = ""
    model: object = field(repr=False, compare=False)
    derive: Callable[[Params, DerivedContext], dict[str, np.ndarray]] = field(
        default=_no_derived, repr=False, compare=False)
    optimum: Callable[[Params, np.ndarray], ComputeOptimal] | None = field(
        default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.params)
        if not (len(self.natural) == len(self.bounds) == len(self.grid) == n):
            raise AnalysisError(f"law {self.name}", n, "needs natural, bounds, grid per parameter")
        if not set(self.exponents) <= set(self.natural):
            raise AnalysisError(f"law {self.name}.exponents", self.exponents, "must be parameters")

    @property
    def n_params(self) -> int:
        return len(self.params)

    @property
    def lower(self) -> np.ndarray:
        return np.array([lo for lo, _ in self.bounds])

    @property
    def upper(self) -> np.ndarray:
        return np.array([hi for _, hi in self.bounds])

    def start_grid(self) -> np.ndarray:
        """The full Cartesian start grid, shape (S, P)."""
        return np.array(list(itertools.product(*self.grid)), dtype=np.float64)

    def target(self, loss: np.ndarray) -> np.ndarray:
        """The response the law predicts: ``log L`` (``log10 L`` for log10 laws)."""
        loss = np.asarray(loss, dtype=np.float64)
        return np.log10(loss) if self.log10 else np.log(loss)

    def prepare(self, data: Data):
        return self.model.prepare({k: np.asarray(data[k], dtype=np.float64)
                                   for k in self.variables})

    def forward(self, theta: np.ndarray, prep):
        """Predicted response ``pred`` (S, n), its Jacobian (a list of P arrays (S, n)), a cache."""
        return self.model.forward(np.atleast_2d(theta), prep)

    def objective_hessian(self, theta: np.ndarray, prep, J: list[np.ndarray], cache,
                          a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """``sum_n a[s, n] J J^T - sum_n c[s, n] Hessian(pred[s, n])``, shape (S, P, P): the
        Hessian of a sum of per-point losses with second derivative ``a`` and first ``-c``."""
        return self.model.objective_hessian(theta, prep, J, cache, a, c)

    def compiled_objective(self, prep):
        """The model's compiled objective kernel for ``prep`` (None: the model has none, or numba
        is missing); see :mod:`moue.analysis.kernels`."""
        compiled = getattr(self.model, "compiled_objective", None)
        return compiled(prep) if compiled is not None else None

    def predict(self, theta: np.ndarray, data: Data) -> np.ndarray:
        """Predicted response (log L or log10 L), shape (S, n)."""
        return self.forward(theta, self.prepare(data))[0]

    def predict_loss(self, theta: np.ndarray, data: Data) -> np.ndarray:
        """Predicted loss (not its log), shape (S, n)."""
        pred = self.predict(theta, data)
        return 10.0**pred if self.log10 else np.exp(pred)

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        """Reported parameters (S, P) in the order of ``natural``."""
        return self.model.to_natural(np.atleast_2d(np.asarray(theta, dtype=np.float64)))

    def from_natural(self, nat: np.ndarray) -> np.ndarray:
        """Fitted parameters (S, P) from reported ones: the inverse of :meth:`to_natural`."""
        return self.model.from_natural(np.atleast_2d(np.asarray(nat, dtype=np.float64)))

    def by_name(self, nat: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of natural parameters ``nat`` (S, P), by name: each an array (S,)."""
        nat = np.atleast_2d(nat)
        return {name: nat[:, j] for j, name in enumerate(self.natural)}

    def derived_quantities(self, params: Params, ctx: DerivedContext) -> dict[str, np.ndarray]:
        """The law's derived quantities (compute-optimal exponents, loss at a target compute,
        best virtual width, ...) from natural parameters by name, evaluated at ``ctx``."""
        return self.derive(params, ctx)

    @property
    def nested_law(self) -> Law | None:
        """The same law without its virtual-width term (``None`` when it has none)."""
        return None if self.nested is None else get_law(self.nested)

    def select(self, variables: Mapping[str, str]) -> dict[str, str]:
        """The entries of ``variables`` (law variable -> column) that this law uses."""
        return {v: variables[v] for v in self.variables if v in variables}


def _log(x: Data, k: str) -> np.ndarray:
    return np.log(x[k])


_EXP = (-20.0, 20.0)  # bounds of an exponent
_LOGC = (-60.0, 120.0)  # bounds of the log of a coefficient
_HALF = (0.0, 0.5, 1.0, 1.5, 2.0)


# ----------------------------------------------------------------------------- compute


def _compute_features(x):
    # params: e, a, alpha   L = E + A C^-alpha
    return term_features(x, 3, [{0: 1.0}, {1: 1.0, 2: -_log(x, "C")}])


def _compute_derived(p, ctx):
    C = ctx.target_compute
    return {} if C is None else {"loss_at_target": p["E"] + p["A"] * C ** -p["alpha"]}


_COMPUTE = Law(
    name="compute",
    formula="L = E + A * C^-alpha",
    variables=("C",),
    params=("e", "a", "alpha"),
    natural=("E", "A", "alpha"),
    bounds=((-10.0, 10.0), _LOGC, (0.0, 10.0)),
    grid=((-1.0, -0.5, 0.0, 0.5, 1.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0),
          (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)),
    exponents=("alpha",),
    reference="Kaplan et al. 2020 (with an irreducible term)",
    model=LSEModel(features=_compute_features, log_params=(True, True, False)),
    derive=_compute_derived,
)


# ----------------------------------------------------------------------------- compute_power


def _power_features(x):
    # params: a, alpha   L = A C^-alpha (no irreducible term: a straight line in log-log)
    return term_features(x, 2, [{0: 1.0, 1: -_log(x, "C")}])


def _power_derived(p, ctx):
    C = ctx.target_compute
    return {} if C is None else {"loss_at_target": p["A"] * C ** -p["alpha"]}


_COMPUTE_POWER = Law(
    name="compute_power",
    formula="L = A * C^-alpha",
    variables=("C",),
    params=("a", "alpha"),
    natural=("A", "alpha"),
    bounds=(_LOGC, (0.0, 10.0)),
    grid=((0.0, 2.0, 5.0, 10.0, 15.0, 20.0), (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)),
    exponents=("alpha",),
    reference="Kaplan et al. 2020 (pure power law; the local slope of loss in compute, "
              "well identified on small ladders where E is not)",
    model=LSEModel(features=_power_features, log_params=(True, False)),
    derive=_power_derived,
)


# ----------------------------------------------------------------------------- chinchilla


def _chinchilla_features(x):
    # params: e, a, alpha, b, beta   L = E + A/N^alpha + B/D^beta
    lN, lD = _log(x, "N"), _log(x, "D")
    return term_features(x, 5, [{0: 1.0}, {1: 1.0, 2: -lN}, {3: 1.0, 4: -lD}])


def _chinchilla_optimum(p, C):
    return compute_optimal(E=p["E"], A=p["A"], alpha=p["alpha"], B=p["B"], beta=p["beta"], C=C)


def _chinchilla_derived(p, ctx):
    out = allocation_exponents(p["alpha"], p["beta"])
    if ctx.target_compute is not None:
        opt = _chinchilla_optimum(p, ctx.target_compute)
        out.update(loss_at_target=opt.loss, n_opt_at_target=opt.n, d_opt_at_target=opt.d)
    return out


_CHINCHILLA = Law(
    name="chinchilla",
    formula="L = E + A / N^alpha + B / D^beta",
    variables=("N", "D"),
    params=("e", "a", "alpha", "b", "beta"),
    natural=("E", "A", "alpha", "B", "beta"),
    bounds=((-10.0, 10.0), _LOGC, (0.0, 10.0), _LOGC, (0.0, 10.0)),
    # Epoch AI's 4,500-point grid (Besiroglu et al. 2024).
    grid=((-1.0, -0.5, 0.0, 0.5, 1.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), _HALF,
          (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), _HALF),
    exponents=("alpha", "beta"),
    reference="Hoffmann et al. 2022; fit as Besiroglu et al. 2024 (arXiv 2404.10102)",
    model=LSEModel(features=_chinchilla_features, log_params=(True, True, False, True, False)),
    derive=_chinchilla_derived,
    optimum=_chinchilla_optimum,
)


# ----------------------------------------------------------------------------- vw_additive


def _additive_features(x):
    # params: e, a, alpha, b, beta, g, gamma   L = E + A/N^alpha + B/D^beta + G/V^gamma
    lN, lD, lV = _log(x, "N"), _log(x, "D"), _log(x, "V")
    return term_features(x, 7, [{0: 1.0}, {1: 1.0, 2: -lN}, {3: 1.0, 4: -lD}, {5: 1.0, 6: -lV}])


def _additive_derived(p, ctx):
    # at each V of the observed range the V term adds to the irreducible loss
    out = allocation_exponents(p["alpha"], p["beta"])
    if ctx.target_compute is None or ctx.v_range is None:
        return out
    V = v_grid(ctx)[:, None]  # (G, 1) against samples (B,)
    E_eff = p["E"] + p["G"] * V ** -p["gamma"]
    opt = compute_optimal(E=E_eff, A=np.broadcast_to(p["A"], E_eff.shape), alpha=p["alpha"],
                          B=p["B"], beta=p["beta"], C=ctx.target_compute)
    out.update(optimum_over_v(V, opt))
    return out


_VW_ADDITIVE = Law(
    name="vw_additive",
    formula="L = E + A / N^alpha + B / D^beta + G / V^gamma",
    variables=("N", "D", "V"),
    params=("e", "a", "alpha", "b", "beta", "g", "gamma"),
    natural=("E", "A", "alpha", "B", "beta", "G", "gamma"),
    bounds=((-10.0, 10.0), _LOGC, (0.0, 10.0), _LOGC, (0.0, 10.0), _LOGC, (0.0, 10.0)),
    grid=((-1.0, 0.0, 1.0), (0.0, 10.0, 20.0), (0.25, 0.75, 1.5), (0.0, 10.0, 20.0),
          (0.25, 0.75, 1.5), (-5.0, 0.0, 5.0), (0.25, 0.75, 1.5)),
    exponents=("alpha", "beta", "gamma"),
    nested="chinchilla",
    reference="docs/FITTING.md (virtual width as a separate additive term)",
    model=LSEModel(features=_additive_features,
                   log_params=(True, True, False, True, False, True, False)),
    derive=_additive_derived,
)


# ----------------------------------------------------------------------------- vw_multiplicative


def _multiplicative_features(x):
    # params: e, a, alpha, gamma, b, beta   L = E + A/(N^alpha V^gamma) + B/D^beta
    lN, lD, lV = _log(x, "N"), _log(x, "D"), _log(x, "V")
    return term_features(x, 6, [{0: 1.0}, {1: 1.0, 2: -lN, 3: -lV}, {4: 1.0, 5: -lD}])


def _multiplicative_derived(p, ctx):
    # at each V of the observed range the V factor scales the parameter term's coefficient
    out = allocation_exponents(p["alpha"], p["beta"])
    if ctx.target_compute is None or ctx.v_range is None:
        return out
    V = v_grid(ctx)[:, None]  # (G, 1) against samples (B,)
    opt = compute_optimal(E=np.broadcast_to(p["E"], (V.shape[0], p["E"].shape[0])),
                          A=p["A"] * V ** -p["gamma"], alpha=p["alpha"], B=p["B"],
                          beta=p["beta"], C=ctx.target_compute)
    out.update(optimum_over_v(V, opt))
    return out


_VW_MULTIPLICATIVE = Law(
    name="vw_multiplicative",
    formula="L = E + A / (N^alpha * V^gamma) + B / D^beta",
    variables=("N", "D", "V"),
    params=("e", "a", "alpha", "gamma", "b", "beta"),
    natural=("E", "A", "alpha", "gamma", "B", "beta"),
    bounds=((-10.0, 10.0), _LOGC, (0.0, 10.0), (-10.0, 10.0), _LOGC, (0.0, 10.0)),
    grid=((-1.0, 0.0, 1.0), (0.0, 10.0, 20.0), (0.25, 0.75, 1.5), (0.0, 0.25, 0.75),
          (0.0, 10.0, 20.0), (0.25, 0.75, 1.5)),
    exponents=("alpha", "gamma", "beta"),
    nested="chinchilla",
    reference="docs/FITTING.md (virtual width scales the parameter term)",
    model=LSEModel(features=_multiplicative_features,
                   log_params=(True, True, False, False, True, False)),
    derive=_multiplicative_derived,
)


# ----------------------------------------------------------------------------- vw_interaction


def _interaction_features(x):
    # params: a, b, c, d   log L = a log N + b log V + c log N log V + d
    lN, lV = _log(x, "N"), _log(x, "V")
    return term_features(x, 4, [{0: lN, 1: lV, 2: lN * lV, 3: 1.0}])


def _interaction_derived(p, ctx):
    a, b, c, d = p["a"], p["b"], p["c"], p["d"]
    out = {"n_cutoff": cutoff(b, c, np.e)}
    if ctx.n_ref is not None and ctx.v_range is not None:
        lN = np.log(ctx.n_ref)
        lV = np.log(v_grid(ctx))[:, None]
        loss = np.exp(a * lN + b * lV + c * lN * lV + d)
        out.update(loss_at_n_ref=loss[-1], loss_gain_v=loss[0] - loss[-1],
                   v_best=np.exp(lV[np.nanargmin(loss, axis=0), 0]))
    return out


_VW_INTERACTION = Law(
    name="vw_interaction",
    formula="log L = a log N + b log V + c log N log V + d",
    variables=("N", "V"),
    params=("a", "b", "c", "d"),
    natural=("a", "b", "c", "d"),
    bounds=((-10.0, 10.0), (-10.0, 10.0), (-10.0, 10.0), (-100.0, 100.0)),
    grid=((-0.1, 0.0), (-0.1, 0.0), (0.0,), (0.0, 1.0)),
    exponents=("a", "b", "c"),
    nested="vw_interaction_base",
    reference="Clark et al. 2022 form with V in place of the expert count",
    model=LSEModel(features=_interaction_features, log_params=(False,) * 4),
    derive=_interaction_derived,
)


def _interaction_base_features(x):
    # params: a, d   log L = a log N + d
    return term_features(x, 2, [{0: _log(x, "N"), 1: 1.0}])


_VW_INTERACTION_BASE = Law(
    name="vw_interaction_base",
    formula="log L = a log N + d",
    variables=("N",),
    params=("a", "d"),
    natural=("a", "d"),
    bounds=((-10.0, 10.0), (-100.0, 100.0)),
    grid=((-0.1, 0.0), (0.0, 1.0)),
    exponents=("a",),
    reference="vw_interaction without its V terms (b = c = 0)",
    model=LSEModel(features=_interaction_base_features, log_params=(False, False)),
)


# ----------------------------------------------------------------------------- clark


class _ClarkModel:
    """Clark et al. 2022 (log10): ``a lN + b lEh + c lN lEh + d`` with the saturating ``Eh``.

    ``1/Eh = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max``. Fitted as ``log_e_start`` and
    ``log_e_gap = log(E_max / E_start) > 0`` so that a box keeps ``E_max > E_start``. The Jacobian
    is analytic; second derivatives are central differences of it (checked in the tests).
    """

    def prepare(self, x: Data):
        return {"lN": np.log10(np.asarray(x["N"], dtype=float)),
                "E": np.asarray(x["E"], dtype=float)}

    def forward(self, theta, prep):
        lN, E = prep["lN"], prep["E"]
        a, b, c, d, ls, lg = (theta[:, i : i + 1] for i in range(6))
        v_max = np.exp(-ls - lg)  # 1 / E_max
        u = np.exp(-ls) - v_max  # 1/E_start - 1/E_max
        q = E[None, :] - 1.0 + 1.0 / u
        inv = 1.0 / q + v_max
        lEh = -np.log10(inv)
        pred = a * lN + b * lEh + c * lN * lEh + d
        dinv_ls = -1.0 / (q * q * u) - v_max
        dinv_lg = v_max / (q * q * u * u) - v_max
        dlEh = -1.0 / (inv * math.log(10.0))
        slope = b + c * lN
        J = [
            np.broadcast_to(lN, pred.shape),
            lEh,
            lN * lEh,
            np.ones_like(pred),
            slope * dlEh * dinv_ls,
            slope * dlEh * dinv_lg,
        ]
        return pred, J, None

    def objective_hessian(self, theta, prep, J, cache, a, c):
        """``sum_n a J J^T - sum_n c d2 pred``; ``d2 pred`` by central differences of ``J``."""
        S, P = theta.shape
        out = np.empty((S, P, P))
        for p in range(P):
            h = 1e-6 * max(1.0, float(np.abs(theta[:, p]).max()))
            up, down = theta.copy(), theta.copy()
            up[:, p] += h
            down[:, p] -= h
            J_up, J_down = self.forward(up, prep)[1], self.forward(down, prep)[1]
            for q in range(P):
                out[:, q, p] = np.einsum("sn,sn->s", c, (J_up[q] - J_down[q]) / (2 * h))
        return weighted_gram(J, a) - 0.5 * (out + out.transpose(0, 2, 1))

    def to_natural(self, theta):
        """``E_start = exp(log_e_start)``, ``E_max = exp(log_e_start + log_e_gap)``."""
        out = theta.copy()
        out[:, 4] = np.exp(theta[:, 4])
        out[:, 5] = np.exp(theta[:, 4] + theta[:, 5])
        return out

    def from_natural(self, nat):
        theta = nat.copy()
        theta[:, 4] = np.log(nat[:, 4])
        theta[:, 5] = np.log(nat[:, 5]) - np.log(nat[:, 4])
        return theta


def _clark_derived(p, ctx):
    return {"n_cutoff": cutoff(p["b"], p["c"], 10.0)}


_CLARK = Law(
    name="clark",
    formula=("log10 L = a log10 N + b log10 Eh + c log10 N log10 Eh + d, "
             "1/Eh = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max"),
    variables=("N", "E"),
    params=("a", "b", "c", "d", "log_e_start", "log_e_gap"),
    natural=("a", "b", "c", "d", "E_start", "E_max"),
    bounds=((-2.0, 2.0), (-2.0, 2.0), (-2.0, 2.0), (-20.0, 20.0), (-3.0, 8.0), (1e-3, 16.0)),
    grid=((-0.1, 0.0), (-0.1, 0.0), (0.0, 0.01), (1.0,), (0.0, 0.5, 1.0, 2.0),
          (1.0, 3.0, 5.0, 8.0)),
    exponents=("a", "b", "c"),
    log10=True,
    delta=1e-2,
    reference="Clark et al. 2022, Unified Scaling Laws for Routed Language Models",
    model=_ClarkModel(),
    derive=_clark_derived,
)


# ----------------------------------------------------------------------------- joint_moe


def _joint_moe_features(x):
    # params: c, a, delta, alpha, gamma, b, omega, beta, zeta
    # L = C + A E^delta N^-(alpha + gamma ln E) + B E^omega D^-(beta + zeta ln E)
    lN, lD, lE = _log(x, "N"), _log(x, "D"), _log(x, "E")
    return term_features(x, 9, [
        {0: 1.0},
        {1: 1.0, 2: lE, 3: -lN, 4: -lE * lN},
        {5: 1.0, 6: lE, 7: -lD, 8: -lE * lD},
    ])


_JOINT_MOE = Law(
    name="joint_moe",
    formula=("L = C + A E^delta / N^(alpha + gamma ln E) + B E^omega / D^(beta + zeta ln E)"
             "  (E used as given: pass a transformed expert count to use Eh)"),
    variables=("N", "D", "E"),
    params=("c", "a", "delta", "alpha", "gamma", "b", "omega", "beta", "zeta"),
    natural=("C", "A", "delta", "alpha", "gamma", "B", "omega", "beta", "zeta"),
    bounds=((-10.0, 10.0), _LOGC, _EXP, (0.0, 10.0), _EXP, _LOGC, _EXP, (0.0, 10.0), _EXP),
    grid=((-1.0, 0.0, 1.0), (0.0, 10.0, 20.0), (0.0,), (0.25, 0.75), (0.0,),
          (0.0, 10.0, 20.0), (0.0,), (0.25, 0.75), (0.0,)),
    exponents=("alpha", "gamma", "beta", "zeta"),
    reference="Ludziejewski et al. 2025, Joint MoE Scaling Laws (arXiv 2502.05172)",
    model=LSEModel(features=_joint_moe_features,
                   log_params=(True, True, False, False, False, True, False, False, False)),
)


# ----------------------------------------------------------------------------- the registry

LAWS: dict[str, Law] = {law.name: law for law in (
    _COMPUTE, _COMPUTE_POWER, _CHINCHILLA, _VW_ADDITIVE, _VW_MULTIPLICATIVE, _VW_INTERACTION,
    _VW_INTERACTION_BASE, _CLARK, _JOINT_MOE)}


def _check_nested(laws: Mapping[str, Law]) -> None:
    """Each law's nested law is registered and uses a subset of the law's variables."""
    for law in laws.values():
        nested = laws.get(law.nested) if law.nested is not None else None
        if law.nested is not None and (nested is None
                                       or not set(nested.variables) <= set(law.variables)):
            raise AnalysisError(f"law {law.name}.nested", law.nested,
                                "must be a registered law using a subset of its variables")


_check_nested(LAWS)


def get_law(name: str) -> Law:
    """The registered law called ``name`` (an :class:`AnalysisError` names the choices)."""
    try:
        return LAWS[name]
    except KeyError:
        raise AnalysisError("law", name, f"is not one of {', '.join(LAWS)}") from None
