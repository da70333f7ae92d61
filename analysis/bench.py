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

from moue.analysis.errors import AnalysisError

__all__ = ["run_fit_bench"]

_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "chinchilla_epoch2024.csv"
_DELTA = 1e-3  # Huber delta of the benchmark (Epoch's)


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
    result = _measure(reference_starts)
    out = stream or sys.stdout
    out.write((_json.dumps(result) if json else _describe(result)) + "\n")
    return result


def _measure(reference_starts: int) -> dict:
    """Time moue's point fit and bootstrap (the stages of ``moue.analysis.fit``) and the reference
    loop on the same problem; the figures ``run_fit_bench`` reports."""
    from moue.analysis.fitting import fit_bootstrap, fit_point, prepare
    from moue.analysis.laws import get_law

    law = get_law("chinchilla")
    data, loss = _epoch_points()
    problem = prepare({**data, "loss": loss}, law=law, loss="loss",
                      variables={"N": "N", "D": "D"}, delta=_DELTA)
    starts = law.start_grid()
    S = starts.shape[0]
    if reference_starts <= 0 or reference_starts >= S:
        ref_idx = np.arange(S)
    else:
        ref_idx = np.sort(np.random.default_rng(0).choice(S, reference_starts, replace=False))

    from moue.analysis import kernels

    # The compiled kernels' first use in a process loads their machine code from numba's cache
    # (or compiles it, once per machine): timed apart, not as part of the fit.
    t0 = time.perf_counter()
    fit_point(problem, starts=starts[:8])
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = fit_point(problem, starts=starts)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    boot = fit_bootstrap(problem, ours, n_bootstrap=1000, seed=0).natural
    boot_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    gtol = problem.options.gtol_rel * problem.delta * problem.points.weights.sum()
    ref_x, ref_f = _reference_loop(law, data, loss, problem.delta, starts[ref_idx], gtol)
    ref_measured = time.perf_counter() - t0
    ref_s = ref_measured * S / ref_idx.size
    rb = int(np.argmin(ref_f))
    sd = {name: float(np.std(col, ddof=1)) for name, col in law.by_name(boot).items()
          if name in ("alpha", "beta")}
    return {
        "speedup": ref_s / fit_s,
        "fit_s": fit_s,
        "reference_s": ref_s,
        "reference_measured_s": ref_measured,
        "reference_starts": int(ref_idx.size),
        "reference_scaled": bool(ref_idx.size < S),
        "n_starts": int(S),
        "max_param_diff": float(np.max(np.abs(ours.theta - ref_x[rb]))),
        "objective_ours": ours.objective,
        "objective_reference": float(ref_f[rb]),
        "params_ours": dict(zip(law.natural, map(float, law.to_natural(ours.theta)[0]))),
        "params_reference": dict(zip(law.natural, map(float, law.to_natural(ref_x[rb])[0]))),
        "best_basin_starts_ours": int(ours.basin.sum()),
        "bootstrap_1000_s": boot_s,
        "bootstrap_sd": sd,
        "compiled": kernels.available(),
        "wide_vectors": kernels.wide_vectors(),
        "warmup_s": warmup_s,
        **machine(),
    }


def machine() -> dict:
    """The CPU model and numpy's BLAS (name, version, threads where it says): the fit's speed
    depends on both, so every benchmark records them."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = "unknown"
    try:
        from threadpoolctl import threadpool_info

        libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if libs:
            blas = ", ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)" for i in libs)
    except ImportError:
        config = np.show_config(mode="dicts") if "mode" in np.show_config.__code__.co_varnames else {}
        lib = config.get("Build Dependencies", {}).get("blas", {}) if isinstance(config, dict) else {}
        blas = f"{lib.get('name', 'unknown')} {lib.get('version', '')}".strip()
    return {"cpu": cpu, "blas": blas, "cpu_count": os.cpu_count(), "numpy": np.__version__}


def _describe(result: dict) -> str:
    """The human-readable form of the figures."""
    S, n_ref = result["n_starts"], result["reference_starts"]
    scaled = (f" (measured {result['reference_measured_s']:.2f} s on {n_ref} random starts, "
              f"scaled x{S / n_ref:.1f} to {S})" if result["reference_scaled"] else "")
    return "\n".join([
        f"Chinchilla fit, Epoch AI data (240 points), {S} starts, Huber delta {_DELTA:g}; "
        f"CPU {result['cpu']}, BLAS {result['blas']}",
        f"  moue batched trust-region Newton: {result['fit_s']:8.2f} s  "
        f"({result['best_basin_starts_ours']} starts reached the best basin; "
        + (f"compiled kernels{', 512-bit vectors' if result['wide_vectors'] else ''}, "
           f"first use {result['warmup_s']:.2f} s apart)" if result["compiled"]
           else "numpy code: numba is missing)"),
        f"  scipy L-BFGS-B loop (ftol=0, analytic gradient): {result['reference_s']:8.2f} s"
        f"{scaled}",
        f"  speed-up: {result['speedup']:.1f}x",
        f"  optima: max |difference| in (e, a, alpha, b, beta) = {result['max_param_diff']:.2e}; "
        f"objective {result['objective_ours']:.10g} vs {result['objective_reference']:.10g}",
        "  " + ", ".join(f"{k}={v:.6g}" for k, v in result["params_ours"].items()) + "  (moue)",
        "  " + ", ".join(f"{k}={v:.6g}" for k, v in result["params_reference"].items())
        + "  (reference)",
        f"  bootstrap, 1000 resamples: {result['bootstrap_1000_s']:.2f} s "
        f"(sd alpha {result['bootstrap_sd']['alpha']:.4f},"
        f" sd beta {result['bootstrap_sd']['beta']:.4f})",
    ])
