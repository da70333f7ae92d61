"""The fitter's trust-region step, compiled (numba; imported on first use by
:func:`moue.analysis.kernels.propose_steps`): per problem, the step of
:func:`moue.analysis.optimize._propose_numpy` from an eigendecomposition of the free block of the
Hessian, in parallel over problems.

- :func:`newton_step`: the Newton step by Cholesky, where the free block is positive definite
  and the step lies inside the trust region (iterations near an optimum);
- :func:`jacobi`: Jacobi rotations in round-robin order (LAPACK's ``syevd`` costs ~3 us per 5x5
  matrix in call overhead alone);
- :func:`secular`: the Levenberg shift that puts the step on the trust region's boundary;
- :func:`propose_kernel`: bounds (a parameter at a bound, pushed outwards, is held), the step,
  its projection on the box, and the decrease the quadratic model predicts.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from moue.analysis._numba_target import WIDE  # noqa: F401  (its import sets numba's vector width, before any njit)

__all__ = ["eigen_step", "free_block", "jacobi", "newton_step", "propose_kernel", "round_robin", "secular"]


@numba.njit(cache=True, error_model="numpy")
def round_robin(P):  # pragma: no cover - compiled
    """The ``P (P - 1) / 2`` index pairs of a Jacobi sweep in rounds of disjoint pairs (the
    round-robin tournament's schedule): ``[rounds, pairs per round, 2]``, every round full; for
    odd ``P`` one index sits out each round."""
    n = P + (P % 2)
    out = np.empty((n - 1, P // 2, 2), dtype=np.int64)
    idx = np.arange(n)
    for r in range(n - 1):
        m = 0
        for i in range(n // 2):
            p, q = idx[i], idx[n - 1 - i]
            if p < P and q < P:
                out[r, m, 0] = min(p, q)
                out[r, m, 1] = max(p, q)
                m += 1
        last = idx[n - 1]
        for i in range(n - 1, 1, -1):  # hold idx[0], rotate the rest by one
            idx[i] = idx[i - 1]
        idx[1] = last
    return out


@numba.njit(cache=True, error_model="numpy")
def jacobi(A, V, rounds, T):  # pragma: no cover - compiled
    """Eigen-decompose the symmetric ``A`` in place (eigenvalues on its diagonal, vectors in
    the columns of ``V``) by Jacobi rotations (Numerical Recipes' update form) in the rounds of
    :func:`round_robin`. A round's rotations touch disjoint rows and columns, so their angles are
    computed first, from the same ``A`` (``T``: ``[pairs per round, 4]`` scratch): independent
    chains of divisions and square roots that the CPU overlaps (1.5x the cyclic order's speed on
    the fit's 5x5 Hessians, with the same eigenvalues to 1e-15)."""
    P = A.shape[0]
    R, M = rounds.shape[0], rounds.shape[1]
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
        for rr in range(R):
            for m in range(M):  # the round's angles
                p, q = rounds[rr, m, 0], rounds[rr, m, 1]
                T[m, 0] = 0.0
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
                T[m, 0] = t
                T[m, 1] = t * c  # sin
                T[m, 2] = t * c / (1.0 + c)  # tau
                T[m, 3] = apq
            for m in range(M):  # the round's rotations
                t = T[m, 0]
                if t == 0.0:
                    continue
                p, q = rounds[rr, m, 0], rounds[rr, m, 1]
                sn, tau, apq = T[m, 1], T[m, 2], T[m, 3]
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


@numba.njit(cache=True, error_model="numpy")
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


@numba.njit(cache=True, error_model="numpy")
def free_block(x, g, H, lower, upper, A, fixed, gf):  # pragma: no cover - compiled
    """For one problem: which parameters are held at a bound (``fixed``), the gradient without
    them (``gf``), and the Hessian with their rows and columns replaced by the identity (``A``)."""
    P = x.shape[0]
    for i in range(P):
        fixed[i] = ((x[i] <= lower[i]) and (g[i] > 0)) or ((x[i] >= upper[i]) and (g[i] < 0))
        gf[i] = 0.0 if fixed[i] else g[i]
    for i in range(P):
        for j in range(P):
            A[i, j] = (1.0 if i == j else 0.0) if (fixed[i] or fixed[j]) else H[i, j]


@numba.njit(cache=True, error_model="numpy")
def newton_step(A, gf, L, d):  # pragma: no cover - compiled
    """``d = -A^-1 gf`` by Cholesky (``L`` its factor) where ``A`` is positive definite: whether it
    is. A fixed parameter's identity row gives it ``d = 0`` exactly."""
    P = A.shape[0]
    for j in range(P):
        sjj = A[j, j]
        for k in range(j):
            sjj -= L[j, k] * L[j, k]
        if not sjj > 0.0:
            return False
        ljj = math.sqrt(sjj)
        L[j, j] = ljj
        for i in range(j + 1, P):
            t = A[i, j]
            for k in range(j):
                t -= L[i, k] * L[j, k]
            L[i, j] = t / ljj
    for i in range(P):  # L z = -gf
        t = -gf[i]
        for k in range(i):
            t -= L[i, k] * d[k]
        d[i] = t / L[i, i]
    for i in range(P - 1, -1, -1):  # L^T d = z
        t = d[i]
        for k in range(i + 1, P):
            t -= L[k, i] * d[k]
        d[i] = t / L[i, i]
    return True


@numba.njit(cache=True, error_model="numpy")
def eigen_step(A, gf, fixed, r, V, ev, gt, d, rounds, T):  # pragma: no cover - compiled
    """``d``: the step of length at most ``r`` from the eigensystem of ``A`` (destroyed): Newton's
    where ``A`` is positive definite and that step is inside, else the boundary step of the shift
    :func:`secular` finds."""
    P = A.shape[0]
    jacobi(A, V, rounds, T)
    for j in range(P):
        ev[j] = A[j, j]
        acc = 0.0
        for i in range(P):
            acc += V[i, j] * gf[i]
        gt[j] = acc
    emin = ev[0]
    nn = 0.0
    for j in range(P):
        emin = min(emin, ev[j])
        cj = gt[j] / (ev[j] if ev[j] > 0 else 1.0)
        nn += cj * cj
    lam = 0.0
    if not (emin > 0 and math.sqrt(nn) <= r):
        lam = secular(ev, gt, r)
    for i in range(P):
        acc = 0.0
        if not fixed[i]:
            for j in range(P):
                acc -= V[i, j] * (gt[j] / (ev[j] + lam))
        d[i] = acc


@numba.njit(parallel=True, cache=True, error_model="numpy")
def propose_kernel(x, g, H, lower, upper, radius, x_new, step_norm, predicted):  # pragma: no cover
    """Every problem's step (rows of ``x``, ``g``, ``H``) into ``x_new``, ``step_norm`` and
    ``predicted``: Newton's when it is a descent step inside the radius (by Cholesky, without
    the eigensystem: 38k of the 210k steps of the Chinchilla benchmark's fit), else from the
    eigensystem (:func:`eigen_step`); then projected on ``[lower, upper]``."""
    S, P = x.shape
    rounds = round_robin(P)
    for s in numba.prange(S):
        A, V, T = np.empty((P, P)), np.empty((P, P)), np.empty((rounds.shape[1], 4))
        fixed = np.empty(P, dtype=np.bool_)
        gf, ev, gt, d = np.empty(P), np.empty(P), np.empty(P), np.empty(P)
        free_block(x[s], g[s], H[s], lower, upper, A, fixed, gf)
        r = radius[s]
        inside = newton_step(A, gf, V, d)
        if inside:
            nn = 0.0
            for i in range(P):
                nn += d[i] * d[i]
            inside = math.sqrt(nn) <= r
        if not inside:
            eigen_step(A, gf, fixed, r, V, ev, gt, d, rounds, T)
        sq = 0.0
        lin = 0.0
        for i in range(P):
            xn = min(max(x[s, i] + d[i], lower[i]), upper[i])
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
