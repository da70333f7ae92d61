"""``moue bench fit``: the vectorised full-grid Chinchilla fit against a scipy L-BFGS-B loop.

Both optimise the same objective (Epoch AI's data, ``chinchilla`` law, summed Huber with
``delta = 1e-3``) from the same 4,500-point start grid with the same bounds and the same gradient
tolerance (scipy: ``ftol=0``, ``gtol`` = moue's). The reference is a fair one: a lean hand-written
numpy objective with its analytic gradient (no numerical differentiation, no per-call overhead of
the batched code), one ``scipy.optimize.minimize(method="L-BFGS-B")`` call per start. By default it
runs a seeded random subset of the starts (``reference_starts``; random, because the cost per start
varies systematically across the grid) and scales its time to the full grid; the output says so.
Both keep their best start; the benchmark reports the largest difference of the optima in the
fitted parametrisation (``e, a, alpha, b, beta``: for coefficients this is the relative difference)
and times a 1,000-resample bootstrap.
"""

from __future__ import annotations

import json as _json
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from analysis.errors import AnalysisError

__all__ = ["run_fit_bench"]

_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "chinchilla_epoch2024.csv"


def _epoch_points():
    import polars as pl

    if not _DATA.exists():
        raise AnalysisError("benchmark data", str(_DATA), "is missing (it ships with the moue "
                            "repository's tests/data)")
    df = pl.read_csv(_DATA)
    fifth_highest = df.get_column("loss").sort(descending=True)[4]
    df = df.filter(pl.col("loss") < fifth_highest)
    N = df.get_column("Model Size").to_numpy()
    C = df.get_column("Training FLOP").to_numpy()
    return {"N": N, "D": C / (6.0 * N)}, df.get_column("loss").to_numpy()


def _reference_loop(law, data, loss, delta, starts, gtol):
    """One scipy L-BFGS-B call per start on a lean numpy objective with analytic gradient."""
    from scipy.optimize import minimize

    lN, lD, y = np.log(data["N"]), np.log(data["D"]), np.log(loss)

    def objective(x):
        e, a, alpha, b, beta = x
        t1, t2 = a - alpha * lN, b - beta * lD
        m = np.maximum(np.maximum(t1, t2), e)
        w0, w1, w2 = np.exp(e - m), np.exp(t1 - m), np.exp(t2 - m)
        tot = w0 + w1 + w2
        r = y - (m + np.log(tot))
        ar = np.abs(r)
        f = np.sum(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)))
        c = -np.clip(r, -delta, delta) / tot
        return f, np.array([c @ w0, c @ w1, -(c * w1) @ lN, c @ w2, -(c * w2) @ lD])

    bounds = list(zip(law.lower, law.upper))
    opts = {"ftol": 0.0, "gtol": gtol, "maxiter": 15000, "maxfun": 15000}
    xs, fs = [], []
    for x0 in starts:
        r = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
        xs.append(r.x)
        fs.append(r.fun)
    return np.array(xs), np.array(fs)


def run_fit_bench(json: bool = False, *, reference_starts: int = 900,
                  stream: TextIO | None = None) -> dict:
    """Run the benchmark, print it (human-readable or one JSON object) and return the figures."""
    from analysis.fitting import FitOptions, _best_basin, _bootstrap, _optimize, _Points
    from analysis.laws import get_law

    out = stream or sys.stdout
    law = get_law("chinchilla")
    data, loss = _epoch_points()
    prep = law.prepare(data)
    y = law.target(loss)
    w = np.ones(loss.shape[0])
    delta = 1e-3
    starts = law.start_grid()
    S = starts.shape[0]
    if reference_starts <= 0 or reference_starts >= S:
        ref_idx = np.arange(S)
    else:
        ref_idx = np.sort(np.random.default_rng(0).choice(S, reference_starts, replace=False))

    t0 = time.perf_counter()
    ours = _optimize(law, prep, y, w, delta, starts, FitOptions(), continuation=True)
    fit_s = time.perf_counter() - t0
    b, basin = _best_basin(law, ours)

    pts = _Points(data=data, loss=loss, weights=w, cluster_index=np.arange(loss.shape[0]),
                  clusters=tuple(str(i) for i in range(loss.shape[0])), compute=6 * data["N"]
                  * data["D"], compute_column="6ND")
    t0 = time.perf_counter()
    boot, _ = _bootstrap(law, prep, y, pts, delta, ours, 1000, 0, FitOptions())
    boot_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_x, ref_f = _reference_loop(law, data, loss, delta, starts[ref_idx],
                                   FitOptions().gtol_rel * delta * w.sum())
    ref_measured = time.perf_counter() - t0
    ref_s = ref_measured * S / ref_idx.size
    rb = int(np.argmin(ref_f))

    diff = float(np.max(np.abs(ours.x[b] - ref_x[rb])))
    nat_ours = law.to_natural(ours.x[b])[0]
    nat_ref = law.to_natural(ref_x[rb])[0]
    result = {
        "speedup": ref_s / fit_s,
        "fit_s": fit_s,
        "reference_s": ref_s,
        "reference_measured_s": ref_measured,
        "reference_starts": int(ref_idx.size),
        "reference_scaled": bool(ref_idx.size < S),
        "n_starts": int(S),
        "max_param_diff": diff,
        "objective_ours": float(ours.f[b]),
        "objective_reference": float(ref_f[rb]),
        "params_ours": dict(zip(law.natural, map(float, nat_ours))),
        "params_reference": dict(zip(law.natural, map(float, nat_ref))),
        "best_basin_starts_ours": int(basin.sum()),
        "bootstrap_1000_s": boot_s,
        "bootstrap_sd": {"alpha": float(np.std(boot[:, 2], ddof=1)),
                         "beta": float(np.std(boot[:, 4], ddof=1))},
    }
    if json:
        out.write(_json.dumps(result) + "\n")
        return result
    scaled = (f" (measured {ref_measured:.2f} s on {ref_idx.size} random starts, scaled "
              f"x{S / ref_idx.size:.1f} to {S})" if result["reference_scaled"] else "")
    lines = [
        f"Chinchilla fit, Epoch AI data (240 points), {S} starts, Huber delta {delta:g}",
        f"  moue batched trust-region Newton: {fit_s:8.2f} s  ({int(basin.sum())} starts reached "
        "the best basin)",
        f"  scipy L-BFGS-B loop (ftol=0, analytic gradient): {ref_s:8.2f} s{scaled}",
        f"  speed-up: {result['speedup']:.1f}x",
        f"  optima: max |difference| in (e, a, alpha, b, beta) = {diff:.2e}; objective "
        f"{result['objective_ours']:.10g} vs {result['objective_reference']:.10g}",
        "  " + ", ".join(f"{k}={v:.6g}" for k, v in result["params_ours"].items()) + "  (moue)",
        "  " + ", ".join(f"{k}={v:.6g}" for k, v in result["params_reference"].items())
        + "  (reference)",
        f"  bootstrap, 1000 resamples: {boot_s:.2f} s "
        f"(sd alpha {result['bootstrap_sd']['alpha']:.4f},"
        f" sd beta {result['bootstrap_sd']['beta']:.4f})",
    ]
    out.write("\n".join(lines) + "\n")
    return result
