"""The fitter's compiled kernels (moue.analysis.kernels) against their numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from moue.analysis import LAWS, get_law
from moue.analysis import kernels
from moue.analysis.models import LSEModel
from moue.analysis.objective import make_objective
from moue.analysis.optimize import _propose_numpy, minimize_batched

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

LSE_LAWS = sorted(name for name, law in LAWS.items() if isinstance(law.model, LSEModel))


def _problem(law, rng, n=40):
    ranges = {"N": (1e6, 1e9), "D": (1e8, 1e11), "C": (1e15, 1e21), "V": (8, 512), "E": (1, 256)}
    data = {v: np.exp(rng.uniform(*np.log(ranges[v]), size=n)) for v in law.variables}
    prep = law.prepare(data)
    grid = law.start_grid()
    theta = grid[rng.choice(grid.shape[0], 64)] + rng.normal(0, 0.3, (64, law.n_params))
    theta = np.clip(theta, law.lower, law.upper)
    y = law.forward(theta[:1], prep)[0][0] + rng.normal(0, 0.05, n)  # both Huber regimes
    return prep, theta, y


def test_every_lse_law_has_a_kernel_and_clark_has_none():
    assert {"chinchilla", "compute", "vw_additive", "joint_moe"} <= set(LSE_LAWS)
    for name in LSE_LAWS:
        law = get_law(name)
        assert law.compiled_objective(law.prepare({v: np.full(3, 10.0) for v in law.variables}))
    clark = get_law("clark")
    assert clark.compiled_objective(clark.prepare({"N": np.ones(3) * 1e8, "E": np.ones(3) * 8})) is None


@pytest.mark.parametrize("per_problem", [False, True], ids=["shared", "resampled"])
@pytest.mark.parametrize("name", LSE_LAWS)
def test_compiled_objective_equals_the_numpy_reference(name, per_problem):
    law = get_law(name)
    rng = np.random.default_rng(3)
    prep, theta, y = _problem(law, rng)
    n = y.shape[0]
    if per_problem:  # bootstrap multiplicities, one row per problem; idx picks the rows
        weights = rng.multinomial(n, np.ones(n) / n, size=100).astype(float)
        idx = rng.choice(100, theta.shape[0], replace=False)
    else:
        weights = rng.uniform(0.5, 2.0, n)
        idx = np.arange(theta.shape[0])
    # the Hessian sums terms that cancel (the softmax's curvature against the Gram matrix):
    # its rounding is relative to the Gram matrix's scale (all points inside: delta=10)
    gram = np.abs(make_objective(law, prep, y, weights, 10.0, compiled=False)(theta, idx)[2]).max()
    for delta in (1e-3, 0.05, 10.0):
        ref = make_objective(law, prep, y, weights, delta, compiled=False)(theta, idx)
        got = make_objective(law, prep, y, weights, delta, compiled=True)(theta, idx)
        for a, b, scale in zip(got, ref, (np.abs(ref[0]).max(), np.abs(ref[1]).max(), gram)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11 * scale)


def test_compiled_objective_is_non_finite_where_the_reference_is():
    law = get_law("chinchilla")
    prep, theta, y = _problem(law, np.random.default_rng(4))
    theta = theta[:4].copy()
    theta[1, 1] = np.nan
    theta[2, 1] = np.inf  # a = inf: the term is inf, its softmax weight inf / inf
    theta[3, 2] = np.inf  # alpha = inf: the term vanishes (N > 1): finite
    for compiled in (True, False):
        fgh = make_objective(law, prep, y, np.ones(y.shape[0]), 1e-3, compiled=compiled)
        f, _, _ = fgh(theta, np.arange(4))
        assert list(np.isfinite(f)) == [True, False, False, True]


def _steps(rng, S=400, P=5, indefinite=False):
    Q = np.linalg.qr(rng.normal(size=(S, P, P)))[0]
    ev = np.exp(rng.uniform(-3, 3, (S, P)))
    if indefinite:
        ev[:, 0] *= -1
    H = np.einsum("spi,si,sqi->spq", Q, ev, Q)
    x = rng.uniform(-1, 1, (S, P))
    x[:50, 0] = -1.0  # on the lower bound: fixed where the gradient pushes outward
    g = rng.normal(size=(S, P)) * 3
    radius = np.exp(rng.uniform(-4, 2, S))
    return x, g, H, -np.ones(P), np.ones(P), radius


@pytest.mark.parametrize("indefinite", [False, True], ids=["definite", "indefinite"])
def test_compiled_step_equals_the_numpy_reference(indefinite):
    x, g, H, lower, upper, radius = _steps(np.random.default_rng(5), indefinite=indefinite)
    got = kernels.propose_steps(x, g, H, lower, upper, radius)
    ref = _propose_numpy(x, g, H, lower, upper, radius, np.eye(x.shape[1]))
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-7)  # the new points
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-7, atol=1e-12)  # step lengths
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-7, atol=1e-12)  # predicted decrease
    assert np.all(got[1] <= radius * (1 + 1e-9))


def test_compiled_step_solves_the_trust_region_subproblem():
    """Where the radius binds, the step has the radius's length; where it does not (definite
    Hessian, Newton step inside), it is the Newton step."""
    rng = np.random.default_rng(6)
    x, g, H, lower, upper, radius = _steps(rng, S=200)
    radius = np.exp(rng.uniform(-2, 4, 200))
    lower, upper = lower * 1e6, upper * 1e6  # no bound binds
    newton = -np.linalg.solve(H, g[..., None])[..., 0]
    x_new, step, _ = kernels.propose_steps(x, g, H, lower, upper, radius)
    inside = np.linalg.norm(newton, axis=1) <= radius
    assert 20 < inside.sum() < 180
    np.testing.assert_allclose(x_new[inside] - x[inside], newton[inside], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(step[~inside], radius[~inside], rtol=1e-9)


def test_fit_with_compiled_kernels_reaches_the_reference_optimum():
    law = get_law("chinchilla")
    rng = np.random.default_rng(7)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 80))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 80))
    loss = (1.7 + 400 / N**0.34 + 410 / D**0.28) * np.exp(rng.normal(0, 0.01, 80))
    prep = law.prepare({"N": N, "D": D})
    y = law.target(loss)
    starts = law.start_grid()[::15]
    out = {}
    for compiled in (True, False):
        fgh = make_objective(law, prep, y, np.ones(80), 1e-3, compiled=compiled)
        res = minimize_batched(fgh, starts, lower=law.lower, upper=law.upper, gtol=1e-11,
                               compiled=compiled)
        b = int(np.argmin(res.f))
        out[compiled] = (res.x[b], res.f[b], res.status)
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-5)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-9)
    assert (out[True][2] == "converged").mean() > 0.8


def test_inlined_exp_and_log_match_numpy():
    import numba

    from moue.analysis._numba_math import exp_neg, log_pos

    @numba.njit
    def both(x, t, e, lg):
        for i in range(x.shape[0]):
            e[i] = exp_neg(x[i])
            lg[i] = log_pos(t[i])

    x = -np.concatenate([np.linspace(0, 700, 200_001), np.geomspace(1e-300, 1, 1000)])
    t = np.concatenate([np.linspace(1, 9, 200_001), np.geomspace(1e-300, 1e300, 1000)])
    e, lg = np.empty_like(x), np.empty_like(t)
    both(x, t, e, lg)
    np.testing.assert_allclose(e, np.exp(x), rtol=5e-16, atol=0)
    np.testing.assert_allclose(lg, np.log(t), rtol=5e-16, atol=3e-16)
    edge = np.array([-708.5, -1e4, -np.inf, np.nan])
    out = np.empty(4)
    both(edge, np.ones(4), out, np.empty(4))
    assert list(out[:3]) == [0.0, 0.0, 0.0] and np.isnan(out[3])


_WIDTH_PROBE = """
import json, sys
import numba
{before}
from moue.analysis import _numba_math, _numba_target
from numba.core import config

@numba.njit(cache=False, fastmath=True)
def dot(a, b):
    acc = 0.0
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc

import numpy as np
dot(np.ones(64), np.ones(64))
asm = "\\n".join(dot.inspect_asm().values())
print(json.dumps({{"wide": _numba_target.WIDE, "features": config.CPU_FEATURES,
                  "zmm": "zmm" in asm}}))
"""


def _width_probe(before: str = "", env: dict | None = None) -> dict:
    import json
    import os
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _WIDTH_PROBE.format(before=before)], env=full_env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_kernels_compile_for_512_bit_vectors_where_the_cpu_has_avx512_unless_the_user_chose():
    """Where the CPU has AVX-512, numba's target loses LLVM's 256-bit preference (the objective's
    loop then runs in zmm registers); the user's NUMBA_CPU_FEATURES, or a numba target that
    already exists, is left alone."""
    from numba.core.codegen import get_host_cpu_features

    host = get_host_cpu_features()
    avx512 = "+avx512f" in host.split(",")
    ours = _width_probe()
    assert ours["wide"] is avx512
    assert ours["zmm"] is avx512  # the setting reaches the machine code
    if avx512:
        assert ours["features"] == f"{host},-prefer-256-bit"
    else:
        assert ours["features"] is None

    # left alone (whether LLVM's own tuning for this CPU uses zmm is not ours to assert)
    users = _width_probe(env={"NUMBA_CPU_FEATURES": host})
    assert (users["wide"], users["features"]) == (False, host)
    late = _width_probe(before="numba.njit(lambda: 1)()")  # a numba target made before ours
    assert (late["wide"], late["features"]) == (False, None)
    off = _width_probe(env={"MOUE_NUMBA_WIDE": "0"})
    assert (off["wide"], off["features"]) == (False, None)


@pytest.mark.parametrize("P", range(1, 8))
def test_jacobi_rounds_cover_every_pair_once_and_decompose_like_lapack(P):
    """Each round of the step's Jacobi sweep holds disjoint pairs, a sweep holds every pair once,
    and the decomposition equals numpy's ``eigh`` (including repeated and zero eigenvalues)."""
    import itertools

    from moue.analysis.numba_step import jacobi, round_robin

    rounds = round_robin(P)
    assert rounds.shape == (P - 1 + P % 2, P // 2, 2)
    assert sorted(map(tuple, rounds.reshape(-1, 2).tolist())) == list(itertools.combinations(range(P), 2))
    for r in rounds:
        assert len(set(r.ravel().tolist())) == r.size
    rng = np.random.default_rng(P)
    Q = np.linalg.qr(rng.normal(size=(P, P)))[0]
    for ev in (rng.normal(size=P) * np.logspace(0, 6, P), np.repeat([2.0, 0.0], [P - P // 2, P // 2])):
        M = (Q * ev) @ Q.T
        M = (M + M.T) / 2
        A, V, T = M.copy(), np.empty((P, P)), np.empty((max(1, P // 2), 4))
        jacobi(A, V, rounds, T)
        np.testing.assert_allclose(np.sort(np.diag(A)), np.linalg.eigvalsh(M), rtol=0,
                                   atol=1e-12 * np.abs(ev).max())
        np.testing.assert_allclose(V @ np.diag(np.diag(A)) @ V.T, M, rtol=0, atol=1e-11 * np.abs(ev).max())
        np.testing.assert_allclose(V.T @ V, np.eye(P), atol=1e-12)
