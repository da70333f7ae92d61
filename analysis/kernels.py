"""Compiled inner loops of the fitter (numba): the LSE objective and the trust-region step.

The vectorised numpy code of :mod:`moue.analysis.objective` and :mod:`moue.analysis.optimize`
makes 30-60 passes over ``(starts, points)`` arrays per evaluation, and each pass either streams
memory or pays numpy's per-call overhead on small blocks; on a 2-core AMD EPYC it took 10-13 us
per start and evaluation (issue 14), one core only. Here one loop per start does the whole
evaluation in registers (one point at a time: its terms, softmax, Huber residual and the
accumulation of ``f``, ``g`` and the Hessian), in parallel over starts on every core.

- :func:`lse_objective`: a kernel generated for one :class:`~moue.analysis.models.LSEModel`'s
  term structure (unrolled over its terms and parameters: a generic loop over the structure was 4x
  slower), written to a source file in the user's cache folder so that numba's on-disk cache
  holds its machine code across processes (the first use of a structure compiles for a few
  seconds; later ones load in well under a second).
- :func:`propose_steps`: :func:`moue.analysis.optimize._propose`'s step per problem, with a
  cyclic Jacobi eigendecomposition (LAPACK's ``syevd`` costs ~3 us per 5x5 matrix in call
  overhead).

Both compute the same quantities as the numpy code, which stays as the reference (and the path
where numba is missing: ``available()`` is False); the tests compare them. numba compiles for
the CPU it runs on, so the speed holds on any x86-64 without settings the user must make.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["available", "lse_objective", "propose_steps"]


@functools.cache
def available() -> bool:
    """Whether the compiled kernels can be used (numba is installed; imported on first use, as it
    brings scipy and llvmlite with it)."""
    return importlib.util.find_spec("numba") is not None


# ----------------------------------------------------------------------------- LSE objective


def _cache_dir() -> Path:
    """The user's own folder for generated kernel sources (and numba's cache beside them)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (Path(base) / "moue" / "kernels",
                 Path(tempfile.gettempdir()) / f"moue-kernels-{os.getuid()}"):
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if root.stat().st_uid == os.getuid() and os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    raise OSError("no writable cache folder for the fitter's kernels")


def _term_source(terms) -> tuple[str, int]:
    """Source of the kernel for ``terms`` (LSEModel.prepare's: per term its parameter indices and
    their features, None meaning 1) and the number of feature rows it reads."""
    P = 1 + max(int(p) for ps, _, _ in terms for p in ps)
    feat_row: list[list[str]] = []
    n_feat = 0
    for ps, feats, _ in terms:
        row = []
        for feat in feats:
            if feat is None:
                row.append("1.0")
            else:
                row.append(f"F[{n_feat}, i]")
                n_feat += 1
        feat_row.append(row)
    K = len(terms)
    L = []
    add = L.append
    add(f"# moue.analysis._numba_math {_math_hash()}")
    add("import numba")
    add("from moue.analysis._numba_math import exp_neg, log_pos")
    add("")
    # reassoc: the sums over points may be reordered, so that the loop vectorises
    add("@numba.njit(parallel=True, cache=True, fastmath={'contract', 'reassoc'})")
    add("def kernel(theta, F, y, w, widx, delta, f_out, g_out, H_out):")
    add("    n = y.shape[0]")
    add("    for s in numba.prange(theta.shape[0]):")
    for p in range(P):
        add(f"        t{p} = theta[s, {p}]")
    add("        ws = w[widx[s]]")
    add("        f = 0.0")
    for p in range(P):
        add(f"        g{p} = 0.0")
        for q in range(p, P):
            add(f"        h{p}_{q} = 0.0")
    add("        for i in range(n):")
    for k, (ps, _, _) in enumerate(terms):
        prods = [f"t{p}" if fr == "1.0" else f"t{p} * {fr}" for p, fr in zip(ps, feat_row[k])]
        add(f"            v{k} = " + " + ".join(prods))
    if K == 1:
        add("            r = y[i] - v0")
        add("            s0 = 1.0")
    else:
        add("            m = v0")
        for k in range(1, K):
            add(f"            m = max(m, v{k})")
        for k in range(K):
            add(f"            u{k} = exp_neg(v{k} - m)")
        add("            tot = " + " + ".join(f"u{k}" for k in range(K)))
        add("            inv = 1.0 / tot")
        # (tot - tot): NaN where a term is (log_pos does not propagate it), else 0
        add("            r = y[i] - m - log_pos(tot) + (tot - tot)")
        for k in range(K):
            add(f"            s{k} = u{k} * inv")
    add("            psi = min(max(r, -delta), delta)")
    add("            wi = ws[i]")
    add("            f += wi * psi * (r - 0.5 * psi)")
    add("            c = wi * psi")
    add("            q = wi * (1.0 if psi == r else 0.0) + c")
    # J_p = sum over the terms using p of s_k * feature
    uses: dict[int, list[tuple[int, str]]] = {p: [] for p in range(P)}
    for k, (ps, _, _) in enumerate(terms):
        for p, fr in zip(ps, feat_row[k]):
            uses[int(p)].append((k, fr))
    for p in range(P):
        parts = [f"s{k}" if fr == "1.0" else f"s{k} * {fr}" for k, fr in uses[p]]
        add(f"            J{p} = " + (" + ".join(parts) if parts else "0.0"))
    for p in range(P):
        add(f"            g{p} -= c * J{p}")
    for p in range(P):
        add(f"            qJ{p} = q * J{p}")
    for p in range(P):
        for q in range(p, P):
            # minus c * sum_k s_k F_kp F_kq over the terms holding both
            corr = []
            for k, (ps, _, _) in enumerate(terms):
                pl = [int(x) for x in ps]
                if p in pl and q in pl:
                    fa, fb = feat_row[k][pl.index(p)], feat_row[k][pl.index(q)]
                    f2 = " * ".join(x for x in (fa, fb) if x != "1.0")
                    corr.append(f"s{k}" + (f" * {f2}" if f2 else ""))
            line = f"            h{p}_{q} += qJ{p} * J{q}"
            if corr:
                line += " - c * (" + " + ".join(corr) + ")"
            add(line)
    add("        f_out[s] = f")
    for p in range(P):
        add(f"        g_out[s, {p}] = g{p}")
        for q in range(p, P):
            add(f"        H_out[s, {p}, {q}] = h{p}_{q}")
            if q != p:
                add(f"        H_out[s, {q}, {p}] = h{p}_{q}")
    return "\n".join(L) + "\n", n_feat


@functools.cache
def _math_hash() -> str:
    """Hash of the inlined exp/log's source: numba's cache does not follow imports, so a change
    there must change the generated kernel's source (and so its file)."""
    return hashlib.sha256((Path(__file__).parent / "_numba_math.py").read_bytes()).hexdigest()[:16]


_LOADED: dict[str, object] = {}


def _load(source: str):
    """Import the kernel module of ``source`` from the cache folder (written once, by name of its
    hash; numba's cache of its machine code lies in ``__pycache__`` beside it)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    if key in _LOADED:
        return _LOADED[key]
    path = _cache_dir() / f"lse_{key}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    name = f"moue_lse_kernel_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _LOADED[key] = module.kernel
    return module.kernel


class LSEKernel:
    """``(theta, w, widx, delta) -> (f, g, H)`` for one LSE term structure: ``w`` (B, n) weights,
    ``widx`` (S,) the row of ``w`` each parameter vector uses."""

    def __init__(self, prep):
        source, _ = _term_source(prep["terms"])
        self._kernel = _load(source)
        feats = [feat for _, fs, _ in prep["terms"] for feat in fs if feat is not None]
        self._F = (np.ascontiguousarray(np.stack(feats)) if feats
                   else np.zeros((1, prep["n"])))
        self.n_params = 1 + max(int(p) for ps, _, _ in prep["terms"] for p in ps)

    def __call__(self, theta, y, w, widx, delta):
        S, P = theta.shape[0], self.n_params
        f, g, H = np.empty(S), np.empty((S, P)), np.empty((S, P, P))
        self._kernel(np.ascontiguousarray(theta, dtype=np.float64), self._F, y,
                     np.ascontiguousarray(w, dtype=np.float64),
                     np.ascontiguousarray(widx, dtype=np.int64), float(delta), f, g, H)
        return f, g, H


def lse_objective(prep) -> LSEKernel | None:
    """The compiled objective of an LSE model's ``prep`` (None without numba); built once per
    ``prep`` and kept in it."""
    if not available():
        return None
    if "_kernel" not in prep:
        prep["_kernel"] = LSEKernel(prep)
    return prep["_kernel"]


# ----------------------------------------------------------------------------- trust-region step

@functools.cache
def _step_kernels():
    """The compiled trust-region step (built on first use)."""
    import numba as _nb


    @_nb.njit(cache=True)
    def _jacobi(A, V):  # pragma: no cover - compiled
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

    @_nb.njit(cache=True)
    def _secular(ev, gt, r):  # pragma: no cover - compiled
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

    @_nb.njit(parallel=True, cache=True)
    def _propose_kernel(x, g, H, lower, upper, radius, x_new, step_norm, predicted):  # pragma: no cover
        S, P = x.shape
        for s in _nb.prange(S):
            A = np.empty((P, P))
            V = np.empty((P, P))
            fixed = np.empty(P, dtype=np.bool_)
            gf = np.empty(P)
            for i in range(P):
                fixed[i] = ((x[s, i] <= lower[i]) and (g[s, i] > 0)) or (
                    (x[s, i] >= upper[i]) and (g[s, i] < 0))
                gf[i] = 0.0 if fixed[i] else g[s, i]
            for i in range(P):
                for j in range(P):
                    if fixed[i] or fixed[j]:
                        A[i, j] = 1.0 if i == j else 0.0
                    else:
                        A[i, j] = H[s, i, j]
            _jacobi(A, V)
            ev = np.empty(P)
            gt = np.empty(P)
            for j in range(P):
                ev[j] = A[j, j]
                acc = 0.0
                for i in range(P):
                    acc += V[i, j] * gf[i]
                gt[j] = acc
            r = radius[s]
            emin = ev[0]
            nn = 0.0
            for j in range(P):
                emin = min(emin, ev[j])
                cj = gt[j] / (ev[j] if ev[j] > 0 else 1.0)
                nn += cj * cj
            lam = 0.0
            if not (emin > 0 and math.sqrt(nn) <= r):
                lam = _secular(ev, gt, r)
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

    return _propose_kernel


def propose_steps(x, g, H, lower, upper, radius):
    """The projected trust-region step of every problem (see ``optimize._propose``): new points,
    step lengths and the decrease the quadratic model predicts."""
    S, P = x.shape
    x_new, step_norm, predicted = np.empty((S, P)), np.empty(S), np.empty(S)
    _step_kernels()(np.ascontiguousarray(x), np.ascontiguousarray(g), np.ascontiguousarray(H),
                    np.ascontiguousarray(lower), np.ascontiguousarray(upper),
                    np.ascontiguousarray(radius), x_new, step_norm, predicted)
    return x_new, step_norm, predicted
