"""How a law is evaluated: batched predictions, exact Jacobians and objective Hessians.

Most laws are a LogSumExp of terms that are linear in the fitted parameters
(``log(E + A / N^alpha) = logsumexp(e, a - alpha log N)``, ``e = log E``); :class:`LSEModel`
evaluates any such law from its feature tensor alone, exploiting its sparsity. A law that does not
fit this mould (``clark``) supplies its own model with the same four methods:

- ``prepare(x)``: what the evaluation needs from the data (computed once per fit);
- ``forward(theta, prep)``: prediction (S, n), Jacobian (a list of P arrays (S, n)) and a cache;
- ``objective_hessian(theta, prep, J, cache, a, c)``: ``sum_n a J J^T - sum_n c d2 pred``;
- ``to_natural(theta)`` / ``from_natural(nat)``: the fitted <-> reported parametrisation.

Shapes: ``S`` parameter vectors (starts or resamples), ``n`` points, ``K`` terms, ``P`` parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Data", "LSEModel", "term_features", "weighted_gram"]

Data = Mapping[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class LSEModel:
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

    def compiled_objective(self, prep):
        """The compiled f, g, H kernel of this term structure (None without numba)."""
        from moue.analysis.kernels import lse_objective

        return lse_objective(prep)

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(self.log_params), np.exp(theta), theta)

    def from_natural(self, nat: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_natural`: logs where the law fits logs."""
        theta = nat.copy()
        logs = np.asarray(self.log_params)
        theta[:, logs] = np.log(nat[:, logs])
        return theta


def weighted_gram(J: list[np.ndarray], c: np.ndarray) -> np.ndarray:
    """``sum_n c[s, n] J[p][s, n] J[q][s, n]``, shape (S, P, P), by row-wise dot products."""
    P = len(J)
    out = np.empty((c.shape[0], P, P))
    for p in range(P):
        cj = c * J[p]
        for q in range(p, P):
            out[:, p, q] = out[:, q, p] = np.einsum("sn,sn->s", cj, J[q])
    return out


def term_features(x: Data, n_params: int, spec: list[dict[int, object]]) -> np.ndarray:
    """Build F (n, K, P) from a list of terms, each ``{param index: 1.0 or feature array}``."""
    n = len(next(iter(x.values())))
    F = np.zeros((n, len(spec), n_params))
    for k, term in enumerate(spec):
        for p, value in term.items():
            F[:, k, p] = value
    return F
