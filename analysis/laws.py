"""The registry of scaling laws: variables, parameters, bounds, start grids, predictions, gradients.

Conventions (FITTING.md):

- Every law predicts the *log* of the loss, and residuals are taken there: ``r = log L - pred``
  (natural log; ``clark`` uses log10 as published).
- Positive coefficients are fitted as their logs (``e = log E``, ``a = log A``); the reported
  (``natural``) parameters are ``E = exp(e)`` and so on. Exponents are fitted as they are.
- Sums of power laws are evaluated as a LogSumExp of terms that are linear in the fitted
  parameters (``log(A / N^alpha) = a - alpha log N``), which is exact and overflow-free.
- ``N`` = active non-embedding parameters, ``D`` = training tokens, ``C`` = training compute
  (FLOPs), ``V`` = virtual width, ``E`` = number of experts (``clark``, ``joint_moe``).

Each :class:`Law` evaluates many parameter vectors at once: ``theta`` has shape ``(S, P)``
(S starts or bootstrap resamples), the data ``n`` points; predictions are ``(S, n)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from analysis.errors import AnalysisError

__all__ = ["LAWS", "Law", "get_law", "weighted_gram"]

Data = Mapping[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class _LSEModel:
    """``pred = logsumexp_k (F_k(x) . theta)``: every term linear in the fitted parameters.

    ``features(x)`` returns ``F`` shaped (n, K, P). ``log_params`` marks parameters that are logs
    of positive coefficients (reported as ``exp``). With softmax weights ``s_k`` of the terms,
    ``J = sum_k s_k F_k`` and ``d2 pred = sum_k s_k F_k F_k^T - J J^T``.
    """

    features: Callable[[Data], np.ndarray]
    log_params: tuple[bool, ...]

    def prepare(self, x: Data) -> dict[str, object]:
        F = np.asarray(self.features(x), dtype=np.float64)  # (n, K, P)
        n, K, P = F.shape
        # Exploit the sparsity of F (each term involves 1-4 parameters, often with feature 1):
        # per term, the parameters it uses and their feature (None when it is exactly 1).
        terms = []
        for k in range(K):
            ps = [p for p in range(P) if np.any(F[:, k, p] != 0.0)]
            feats = [None if np.all(F[:, k, p] == 1.0) else np.ascontiguousarray(F[:, k, p])
                     for p in ps]
            block = np.stack([F[:, k, p] for p in ps], axis=1)  # (n, |ps|)
            outer = np.einsum("np,nq->npq", block, block).reshape(n, len(ps) ** 2)
            terms.append((np.array(ps, dtype=np.intp), feats, outer))
        uses = [[(k, j) for k, (ps, _, _) in enumerate(terms) for j, q in enumerate(ps) if q == p]
                for p in range(P)]
        return {"terms": terms, "uses": uses, "n": n}

    def forward(self, theta: np.ndarray, prep) -> tuple[np.ndarray, list[np.ndarray], object]:
        S, n = theta.shape[0], prep["n"]
        values = []
        for ps, feats, _ in prep["terms"]:  # term_k = sum_p theta_p F_kp, as (S, n)
            v = np.zeros((S, n))
            for p, feat in zip(ps, feats):
                v += theta[:, p, None] if feat is None else theta[:, p, None] * feat[None, :]
            values.append(v)
        if len(values) == 1:
            ps, feats, _ = prep["terms"][0]
            J = [np.zeros((S, n)) for _ in range(theta.shape[1])]
            for p, feat in zip(ps, feats):
                J[p] = np.broadcast_to(1.0 if feat is None else feat, (S, n))
            return values[0], J, None
        m = values[0].copy()
        for v in values[1:]:
            np.maximum(m, v, out=m)
        w = []
        for v in values:
            v -= m
            w.append(np.exp(v, out=v))
        tot = w[0].copy()
        for wk in w[1:]:
            tot += wk
        inv = 1.0 / tot
        for wk in w:
            wk *= inv
        J = []  # dpred/dtheta_p = sum_k s_k F_kp  (arrays may alias the cache; never modified)
        for use in prep["uses"]:
            parts = []
            for k, j in use:
                feat = prep["terms"][k][1][j]
                parts.append(w[k] if feat is None else w[k] * feat[None, :])
            if not parts:
                J.append(np.zeros((S, n)))
            else:
                J.append(parts[0] if len(parts) == 1 else sum(parts[1:], parts[0]))
        return m + np.log(tot), J, w

    def objective_hessian(self, theta, prep, J, cache, a: np.ndarray, c: np.ndarray):
        """``sum_n a J J^T - sum_n c d2 pred`` (S, P, P), with ``d2 pred = sum_k s_k F_k F_k^T -
        J J^T``: one weighted Gram matrix with ``a + c`` minus the per-term blocks."""
        S, P = theta.shape
        out = weighted_gram(J, a + c if cache is not None else a)
        if cache is not None:
            for wk, (ps, _, outer) in zip(cache, prep["terms"]):
                out[:, ps[:, None], ps[None, :]] -= ((c * wk) @ outer).reshape(S, ps.size, ps.size)
        return out

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(self.log_params), np.exp(theta), theta)


def weighted_gram(J: list[np.ndarray], c: np.ndarray) -> np.ndarray:
    """``sum_n c[s, n] J[p][s, n] J[q][s, n]``, shape (S, P, P), by row-wise dot products."""
    P = len(J)
    out = np.empty((c.shape[0], P, P))
    for p in range(P):
        cj = c * J[p]
        for q in range(p, P):
            out[:, p, q] = out[:, q, p] = np.einsum("sn,sn->s", cj, J[q])
    return out


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
        out = theta.copy()
        out[:, 4] = np.exp(theta[:, 4])
        out[:, 5] = np.exp(theta[:, 4] + theta[:, 5])
        return out


@dataclass(frozen=True, kw_only=True)
class Law:
    """A scaling law: what it needs, what it fits, where to start, how to predict.

    ``params`` are the fitted (log-space where noted) names, ``natural`` the reported names in the
    same order. ``bounds`` and ``grid`` are per fitted parameter; the start grid is their Cartesian
    product. ``exponents`` (natural names) are what the regression gate watches. ``nested``
    names the same law without its virtual-width term (for the likelihood-ratio test).
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
    nested: str | None = None
    reference: str = ""
    model: object = field(repr=False, compare=False)

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


def _log(x: Data, k: str) -> np.ndarray:
    return np.log(x[k])


def _terms(x: Data, n_params: int, spec: list[dict[int, object]]) -> np.ndarray:
    """Build F (n, K, P) from a list of terms, each ``{param index: 1.0 or feature array}``."""
    n = len(next(iter(x.values())))
    F = np.zeros((n, len(spec), n_params))
    for k, term in enumerate(spec):
        for p, value in term.items():
            F[:, k, p] = value
    return F


def _compute_features(x):
    # params: e, a, alpha   L = E + A C^-alpha
    return _terms(x, 3, [{0: 1.0}, {1: 1.0, 2: -_log(x, "C")}])


def _power_features(x):
    # params: a, alpha   L = A C^-alpha (no irreducible term: a straight line in log-log)
    return _terms(x, 2, [{0: 1.0, 1: -_log(x, "C")}])


def _chinchilla_features(x):
    # params: e, a, alpha, b, beta   L = E + A/N^alpha + B/D^beta
    lN, lD = _log(x, "N"), _log(x, "D")
    return _terms(x, 5, [{0: 1.0}, {1: 1.0, 2: -lN}, {3: 1.0, 4: -lD}])


def _additive_features(x):
    # params: e, a, alpha, b, beta, g, gamma   L = E + A/N^alpha + B/D^beta + G/V^gamma
    lN, lD, lV = _log(x, "N"), _log(x, "D"), _log(x, "V")
    return _terms(x, 7, [{0: 1.0}, {1: 1.0, 2: -lN}, {3: 1.0, 4: -lD}, {5: 1.0, 6: -lV}])


def _multiplicative_features(x):
    # params: e, a, alpha, gamma, b, beta   L = E + A/(N^alpha V^gamma) + B/D^beta
    lN, lD, lV = _log(x, "N"), _log(x, "D"), _log(x, "V")
    return _terms(x, 6, [{0: 1.0}, {1: 1.0, 2: -lN, 3: -lV}, {4: 1.0, 5: -lD}])


def _interaction_features(x):
    # params: a, b, c, d   log L = a log N + b log V + c log N log V + d
    lN, lV = _log(x, "N"), _log(x, "V")
    return _terms(x, 4, [{0: lN, 1: lV, 2: lN * lV, 3: 1.0}])


def _interaction_n_features(x):
    # params: a, d   log L = a log N + d
    return _terms(x, 2, [{0: _log(x, "N"), 1: 1.0}])


def _joint_moe_features(x):
    # params: c, a, delta, alpha, gamma, b, omega, beta, zeta
    # L = C + A E^delta N^-(alpha + gamma ln E) + B E^omega D^-(beta + zeta ln E)
    lN, lD, lE = _log(x, "N"), _log(x, "D"), _log(x, "E")
    return _terms(
        x,
        9,
        [
            {0: 1.0},
            {1: 1.0, 2: lE, 3: -lN, 4: -lE * lN},
            {5: 1.0, 6: lE, 7: -lD, 8: -lE * lD},
        ],
    )


_EXP = (-20.0, 20.0)  # bounds of an exponent
_LOGC = (-60.0, 120.0)  # bounds of the log of a coefficient
_HALF = (0.0, 0.5, 1.0, 1.5, 2.0)

LAWS: dict[str, Law] = {
    law.name: law
    for law in [
        Law(
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
            model=_LSEModel(features=_compute_features, log_params=(True, True, False)),
        ),
        Law(
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
            model=_LSEModel(features=_power_features, log_params=(True, False)),
        ),
        Law(
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
            model=_LSEModel(features=_chinchilla_features,
                            log_params=(True, True, False, True, False)),
        ),
        Law(
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
            reference="FITTING.md (virtual width as a separate additive term)",
            model=_LSEModel(features=_additive_features,
                            log_params=(True, True, False, True, False, True, False)),
        ),
        Law(
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
            reference="FITTING.md (virtual width scales the parameter term)",
            model=_LSEModel(features=_multiplicative_features,
                            log_params=(True, True, False, False, True, False)),
        ),
        Law(
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
            model=_LSEModel(features=_interaction_features, log_params=(False,) * 4),
        ),
        Law(
            name="vw_interaction_base",
            formula="log L = a log N + d",
            variables=("N",),
            params=("a", "d"),
            natural=("a", "d"),
            bounds=((-10.0, 10.0), (-100.0, 100.0)),
            grid=((-0.1, 0.0), (0.0, 1.0)),
            exponents=("a",),
            reference="vw_interaction without its V terms (b = c = 0)",
            model=_LSEModel(features=_interaction_n_features, log_params=(False, False)),
        ),
        Law(
            name="clark",
            formula=("log10 L = a log10 N + b log10 Eh + c log10 N log10 Eh + d, "
                     "1/Eh = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max"),
            variables=("N", "E"),
            params=("a", "b", "c", "d", "log_e_start", "log_e_gap"),
            natural=("a", "b", "c", "d", "E_start", "E_max"),
            bounds=((-2.0, 2.0), (-2.0, 2.0), (-2.0, 2.0), (-20.0, 20.0), (-3.0, 8.0),
                    (1e-3, 16.0)),
            grid=((-0.1, 0.0), (-0.1, 0.0), (0.0, 0.01), (1.0,), (0.0, 0.5, 1.0, 2.0),
                  (1.0, 3.0, 5.0, 8.0)),
            exponents=("a", "b", "c"),
            log10=True,
            reference="Clark et al. 2022, Unified Scaling Laws for Routed Language Models",
            model=_ClarkModel(),
        ),
        Law(
            name="joint_moe",
            formula=("L = C + A E^delta / N^(alpha + gamma ln E) + B E^omega / D^(beta + zeta ln E)"
                     "  (E used as given: pass a transformed expert count to use Eh)"),
            variables=("N", "D", "E"),
            params=("c", "a", "delta", "alpha", "gamma", "b", "omega", "beta", "zeta"),
            natural=("C", "A", "delta", "alpha", "gamma", "B", "omega", "beta", "zeta"),
            bounds=((-10.0, 10.0), _LOGC, _EXP, (0.0, 10.0), _EXP, _LOGC, _EXP, (0.0, 10.0),
                    _EXP),
            grid=((-1.0, 0.0, 1.0), (0.0, 10.0, 20.0), (0.0,), (0.25, 0.75), (0.0,),
                  (0.0, 10.0, 20.0), (0.0,), (0.25, 0.75), (0.0,)),
            exponents=("alpha", "gamma", "beta", "zeta"),
            reference="Ludziejewski et al. 2025, Joint MoE Scaling Laws (arXiv 2502.05172)",
            model=_LSEModel(features=_joint_moe_features,
                            log_params=(True, True, False, False, False, True, False, False,
                                        False)),
        ),
    ]
}


def get_law(name: str) -> Law:
    """The registered law called ``name`` (an :class:`AnalysisError` names the choices)."""
    try:
        return LAWS[name]
    except KeyError:
        raise AnalysisError("law", name, f"is not one of {', '.join(LAWS)}") from None
