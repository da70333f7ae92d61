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
the CPU it runs on, so the speed holds on any x86-64 without settings the user must make; where
the CPU has AVX-512 it compiles for 512-bit vectors (:mod:`moue.analysis._numba_target`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["available", "lse_objective", "propose_steps", "wide_vectors"]


@functools.cache
def available() -> bool:
    """Whether the compiled kernels can be used (numba is installed; imported on first use, as it
    brings scipy and llvmlite with it)."""
    return importlib.util.find_spec("numba") is not None


def wide_vectors() -> bool:
    """Whether this process's kernels compile for 512-bit vectors (False before any kernel was
    loaded, or without numba); asking changes nothing."""
    target = sys.modules.get("moue.analysis._numba_target")
    return bool(target is not None and target.WIDE)


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


def _term_source(terms) -> str:
    """Source of the kernel for ``terms`` (LSEModel.prepare's: per term its parameter indices and
    their features, None meaning 1): one loop per start over the points, unrolled over the terms
    and parameters."""
    P = 1 + max(int(p) for ps, _, _ in terms for p in ps)
    rows = _feature_rows(terms)
    lines = [f"# moue.analysis._numba_math {_math_hash()}",
             "import numba",
             "from moue.analysis._numba_math import exp_neg, log_pos",
             "",
             # reassoc: the sums over points may be reordered, so that the loop vectorises
             "@numba.njit(parallel=True, cache=True, fastmath={'contract', 'reassoc'})",
             "def kernel(theta, F, y, w, widx, delta, f_out, g_out, H_out):",
             "    n = y.shape[0]",
             "    for s in numba.prange(theta.shape[0]):"]
    lines += [f"        t{p} = theta[s, {p}]" for p in range(P)]
    lines += ["        ws = w[widx[s]]", "        f = 0.0"]
    for p in range(P):
        lines.append(f"        g{p} = 0.0")
        lines += [f"        h{p}_{q} = 0.0" for q in range(p, P)]
    lines.append("        for i in range(n):")
    lines += ["            " + line for line in _point_lines(terms, rows, P)]
    lines.append("        f_out[s] = f")
    for p in range(P):
        lines.append(f"        g_out[s, {p}] = g{p}")
        for q in range(p, P):
            lines.append(f"        H_out[s, {p}, {q}] = h{p}_{q}")
            if q != p:
                lines.append(f"        H_out[s, {q}, {p}] = h{p}_{q}")
    return "\n".join(lines) + "\n"


def _feature_rows(terms) -> list[list[str]]:
    """Per term, per parameter, the expression of its feature: ``F[j, i]`` (the j-th non-constant
    feature over all terms, as LSEKernel stacks them) or ``1.0``."""
    rows, j = [], 0
    for _, feats, _ in terms:
        row = []
        for feat in feats:
            row.append("1.0" if feat is None else f"F[{j}, i]")
            j += feat is not None
        rows.append(row)
    return rows


def _times(*factors: str) -> str:
    """The product of ``factors`` without its ``1.0`` factors."""
    kept = [x for x in factors if x != "1.0"]
    return " * ".join(kept) if kept else "1.0"


def _point_lines(terms, rows, P: int) -> list[str]:
    """One point's contribution: its terms, their softmax ``s_k`` and the log-sum-exp, the Huber
    residual, then ``f``, the gradient and the Hessian's upper triangle accumulated."""
    K = len(terms)
    out = [f"v{k} = " + " + ".join(_times(f"t{p}", fr) for p, fr in zip(ps, rows[k]))
           for k, (ps, _, _) in enumerate(terms)]
    if K == 1:
        out += ["r = y[i] - v0", "s0 = 1.0"]
    else:
        out.append("m = v0")
        out += [f"m = max(m, v{k})" for k in range(1, K)]
        out += [f"u{k} = exp_neg(v{k} - m)" for k in range(K)]
        out += ["tot = " + " + ".join(f"u{k}" for k in range(K)), "inv = 1.0 / tot",
                # (tot - tot): NaN where a term is (log_pos does not propagate it), else 0
                "r = y[i] - m - log_pos(tot) + (tot - tot)"]
        out += [f"s{k} = u{k} * inv" for k in range(K)]
    out += ["psi = min(max(r, -delta), delta)", "wi = ws[i]", "f += wi * psi * (r - 0.5 * psi)",
            "c = wi * psi", "q = wi * (1.0 if psi == r else 0.0) + c"]
    # d(-r)/dt_p = J_p = the sum over the terms using p of s_k * feature
    where = [[(k, rows[k][[int(x) for x in ps].index(p)]) for k, (ps, _, _) in enumerate(terms)
              if p in [int(x) for x in ps]] for p in range(P)]
    out += [f"J{p} = " + (" + ".join(_times(f"s{k}", fr) for k, fr in where[p]) or "0.0") for p in range(P)]
    out += [f"g{p} -= c * J{p}" for p in range(P)]
    out += [f"qJ{p} = q * J{p}" for p in range(P)]
    for p in range(P):
        both = dict(where[p])
        for q in range(p, P):
            # minus c * sum_k s_k F_kp F_kq over the terms holding both
            corr = [_times(f"s{k}", both[k], fr) for k, fr in where[q] if k in both]
            out.append(f"h{p}_{q} += qJ{p} * J{q}" + (" - c * (" + " + ".join(corr) + ")" if corr else ""))
    return out


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
        self._kernel = _load(_term_source(prep["terms"]))
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

def propose_steps(x, g, H, lower, upper, radius):
    """The projected trust-region step of every problem (see ``optimize._propose``): new points,
    step lengths and the decrease the quadratic model predicts (numba imported on first use)."""
    from moue.analysis.numba_step import propose_kernel

    S, P = x.shape
    x_new, step_norm, predicted = np.empty((S, P)), np.empty(S), np.empty(S)
    propose_kernel(np.ascontiguousarray(x), np.ascontiguousarray(g), np.ascontiguousarray(H),
                    np.ascontiguousarray(lower), np.ascontiguousarray(upper),
                    np.ascontiguousarray(radius), x_new, step_norm, predicted)
    return x_new, step_norm, predicted
