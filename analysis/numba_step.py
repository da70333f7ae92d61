"""The fitter's trust-region step, compiled (numba; imported on first use by
:func:`moue.analysis.kernels.propose_steps`): per problem, the step of
:func:`moue.analysis.optimize._propose_numpy` from an eigendecomposition of the free block of the
Hessian, in parallel over problems.

- :func:`jacobi`: cyclic Jacobi rotations (LAPACK's ``syevd`` costs ~3 us per 5x5 matrix in call
  overhead alone);
- :func:`secular`: the Levenberg shift that puts the step on the trust region's boundary;
- :func:`propose_kernel`: bounds (a parameter at a bound, pushed outwards, is held), the step,
  its projection on the box, and the decrease the quadratic model predicts.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from moue.analysis import _numba_target  # noqa: F401  (sets numba's vector width before any njit)

__all__ = ["jacobi", "propose_kernel", "secular"]


@numba.njit(cache=True)
def jacobi(A, V):  # pragma: no cover - compiled
    """Eigen-decompose the symmetric ``A`` in place (eigenvalues on its diagonal, vectors in
    the columns of ``V``) by cyclic Jacobi rotations (Numerical Recipes' update form)."""
    P = A.shape[0]
    for i in range(P):
        for j in range(P):
            V[i, j] = 1.0 if i == j else 0.0
    for _ in range(60):
        off = 0.0
        scale = 0.0
        for i in range(P):
            scale += A[i, i] * A[i, i]
            for j in range(i + 1, P):
                off += A[i, j] * A[i, j]
        if off <= 1e-34 * scale or off == 0.0:
            break
        for p in range(P - 1):
            for q in range(p + 1, P):
                apq = A[p, q]
                if apq == 0.0:
                    continue
                th = (A[q, q] - A[p, p]) / (2.0 * apq)
                if abs(th) > 1e150:
                    t = 0.5 / th
                else:
                    t = 1.0 / (abs(th) + math.sqrt(th * th + 1.0))
                    if th < 0.0:
                        t = -t
                c = 1.0 / math.sqrt(t * t + 1.0)
                sn = t * c
                tau = sn / (1.0 + c)
                A[p, p] -= t * apq
                A[q, q] += t * apq
                A[p, q] = 0.0
                A[q, p] = 0.0
                for k in range(P):
                    if k != p and k != q:
                        akp, akq = A[k, p], A[k, q]
                        A[k, p] = A[p, k] = akp - sn * (akq + tau * akp)
                        A[k, q] = A[q, k] = akq + sn * (akp - tau * akq)
                    vkp, vkq = V[k, p], V[k, q]
                    V[k, p] = vkp - sn * (vkq + tau * vkp)
                    V[k, q] = vkq + sn * (vkp - tau * vkq)


@numba.njit(cache=True)
def secular(ev, gt, r):  # pragma: no cover - compiled
    """The smallest ``lam >= max(0, -min ev)`` with ``|gt / (ev + lam)| <= r`` (``r`` > 0; to a
    relative 1e-10 in ``|c|``): safeguarded Newton on ``1/r - 1/|c(lam)|`` (More and Sorensen), bracketed so that it
    cannot leave the root's interval; the "hard case" is absorbed by a tiny extra shift."""
    P = ev.shape[0]
    emin = ev[0]
    emax = 0.0
    gn = 0.0
    for j in range(P):
        emin = min(emin, ev[j])
        emax = max(emax, abs(ev[j]))
        gn += gt[j] * gt[j]
    lo = max(0.0, -emin) + 1e-12 * max(emax, 1e-300)
    hi = lo + math.sqrt(gn) / r + 1e-300  # there every |ev + lam| >= |g| / r
    lam = lo
    for _ in range(200):
        n2 = 0.0
        q2 = 0.0
        for j in range(P):
            d = ev[j] + lam
            cj = gt[j] / d
            n2 += cj * cj
            q2 += cj * cj / d
        nrm = math.sqrt(n2)
        if abs(nrm - r) <= 1e-10 * r:
            return lam
        if nrm <= r:
            if lam == lo:
                return lam
            hi = lam
        else:
            lo = lam
        if hi - lo <= 1e-15 * hi:
            return hi
        step = (nrm - r) / r * n2 / q2 if q2 > 0 else 0.0
        new = lam + step
        if not (lo < new < hi):
            new = 0.5 * (lo + hi)
        lam = new
    return hi


@numba.njit(cache=True)
def free_eigensystem(x, g, H, lower, upper, A, V, fixed, gf, ev, gt):  # pragma: no cover - compiled
    """For one problem: which parameters are held at a bound (``fixed``), the gradient without
    them (``gf``), and the eigensystem of the Hessian with their rows and columns replaced by the
    identity (``ev``, vectors in ``V``; ``gt`` the gradient in that basis)."""
    P = x.shape[0]
    for i in range(P):
        fixed[i] = ((x[i] <= lower[i]) and (g[i] > 0)) or ((x[i] >= upper[i]) and (g[i] < 0))
        gf[i] = 0.0 if fixed[i] else g[i]
    for i in range(P):
        for j in range(P):
            A[i, j] = (1.0 if i == j else 0.0) if (fixed[i] or fixed[j]) else H[i, j]
    jacobi(A, V)
    for j in range(P):
        ev[j] = A[j, j]
        acc = 0.0
        for i in range(P):
            acc += V[i, j] * gf[i]
        gt[j] = acc


@numba.njit(parallel=True, cache=True)
def propose_kernel(x, g, H, lower, upper, radius, x_new, step_norm, predicted):  # pragma: no cover
    """Every problem's step (rows of ``x``, ``g``, ``H``) into ``x_new``, ``step_norm`` and
    ``predicted``: Newton's when it is a descent step inside the radius, else the boundary step
    of the shift :func:`secular` finds; then projected on ``[lower, upper]``."""
    S, P = x.shape
    for s in numba.prange(S):
        A, V = np.empty((P, P)), np.empty((P, P))
        fixed = np.empty(P, dtype=np.bool_)
        gf, ev, gt = np.empty(P), np.empty(P), np.empty(P)
        free_eigensystem(x[s], g[s], H[s], lower, upper, A, V, fixed, gf, ev, gt)
        r = radius[s]
        emin = ev[0]
        nn = 0.0
        for j in range(P):
            emin = min(emin, ev[j])
            cj = gt[j] / (ev[j] if ev[j] > 0 else 1.0)
            nn += cj * cj
        lam = 0.0
        if not (emin > 0 and math.sqrt(nn) <= r):
            lam = secular(ev, gt, r)
        sq = 0.0
        lin = 0.0
        for i in range(P):
            d = 0.0
            if not fixed[i]:
                for j in range(P):
                    d -= V[i, j] * (gt[j] / (ev[j] + lam))
            xn = min(max(x[s, i] + d, lower[i]), upper[i])
            x_new[s, i] = xn
            st = xn - x[s, i]
            gf[i] = st  # reuse: the step
            sq += st * st
            lin += g[s, i] * st
        quad = 0.0
        for i in range(P):
            acc = 0.0
            for j in range(P):
                acc += H[s, i, j] * gf[j]
            quad += gf[i] * acc
        step_norm[s] = math.sqrt(sq)
        predicted[s] = -(lin + 0.5 * quad)
