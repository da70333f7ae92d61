"""The fitting objective: summed, weighted Huber loss of log-space residuals.

``f(theta) = sum_n w_n * huber_delta(y_n - pred_n(theta))`` with ``y = log L`` (``log10 L`` for
log10 laws) and ``huber_delta(r) = r^2 / 2`` for ``|r| <= delta``, ``delta (|r| - delta / 2)``
beyond: the same function as ``scipy.special.huber(delta, r)``, summed (not averaged) as in Epoch
AI's replication of Chinchilla. Gradient and exact Hessian are returned for batches of parameter
vectors; weights may be one vector (all problems share the data: multi-start) or one row per
problem (bootstrap resamples as multiplicity weights).
"""

from __future__ import annotations

import numpy as np

from moue.analysis.laws import Law

__all__ = ["huber", "make_objective"]

# Elements of the (chunk, n, P) Jacobian per block: small blocks keep every temporary in cache
# (3x faster than one big block on a 2-core machine). 300,000 was chosen on the development
# machine and is 2x slower than 120,000 on an AMD EPYC (issue 14: 6.0 s against 3.0 s for the
# 4,500-start Chinchilla fit), where 30,000-1,000,000 differ by 20% once glibc keeps large blocks
# in its heap: the blocks' temporaries are mmapped and page-faulted anew at every block beyond
# its threshold. 120,000 was the best of 30,000-500,000 there; it is not measured on the
# development machine.
_CHUNK_ELEMENTS = 120_000


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber function with threshold ``delta`` (equal to ``scipy.special.huber(delta, r)``)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def make_objective(law: Law, prep, y: np.ndarray, weights: np.ndarray, delta: float,
                   *, hessian: bool = True, compiled: bool = True):
    """``fgh(theta_SP, idx_S) -> (f_S, g_SP, H_SPP)`` (``H`` is None when ``hessian=False``).

    ``weights`` is (n,) shared by every problem, or (B, n) with problem ``idx[s]`` using row
    ``idx[s]``. ``compiled``: use the law's compiled kernel where it has one
    (:mod:`moue.analysis.kernels`; the numpy code below is its reference).
    """
    y = np.asarray(y, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    n, P = y.shape[0], law.n_params
    kernel = law.compiled_objective(prep) if compiled and hessian else None
    if kernel is not None:
        shared = weights.ndim == 1
        w2 = weights[None, :] if shared else weights

        def fgh_compiled(theta: np.ndarray, idx: np.ndarray):
            theta = np.atleast_2d(theta)
            widx = np.zeros(theta.shape[0], dtype=np.int64) if shared else idx
            return kernel(theta, y, w2, widx, delta)

        return fgh_compiled

    def block(theta, w):
        pred, J, cache = law.forward(theta, prep)
        r = y[None, :] - pred
        a = np.abs(r)
        inside = a <= delta
        f = (w * np.where(inside, 0.5 * r * r, delta * (a - 0.5 * delta))).sum(axis=1)
        wpsi = w * np.clip(r, -delta, delta)
        g = -np.stack([np.einsum("sn,sn->s", wpsi, Jp) for Jp in J], axis=1)
        if not hessian:
            return f, g, None
        # d2 f = sum_n w [h''(r) J J^T - psi d2 pred]
        return f, g, law.objective_hessian(theta, prep, J, cache, w * inside, wpsi)

    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * P))

    def fgh(theta: np.ndarray, idx: np.ndarray):
        theta = np.atleast_2d(theta)
        S = theta.shape[0]
        f = np.empty(S)
        g = np.empty((S, P))
        H = np.empty((S, P, P)) if hessian else None
        for lo in range(0, S, chunk):
            hi = min(S, lo + chunk)
            w = weights[idx[lo:hi]] if weights.ndim == 2 else weights[None, :]
            fb, gb, Hb = block(theta[lo:hi], w)
            f[lo:hi], g[lo:hi] = fb, gb
            if hessian:
                H[lo:hi] = Hb
        return f, g, H

    return fgh
