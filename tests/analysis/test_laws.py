"""Contract tests every law must pass: derivatives, shapes, registry, errors."""

from __future__ import annotations

import numpy as np
import pytest

from moue.analysis import LAWS, AnalysisError, DerivedContext, get_law
from moue.analysis.objective import huber, make_objective


def _data(law, rng, n=30):
    ranges = {"N": (1e6, 1e9), "D": (1e8, 1e11), "C": (1e15, 1e21), "V": (8, 512), "E": (1, 256)}
    return {v: np.exp(rng.uniform(*np.log(ranges[v]), size=n)) for v in law.variables}


def _theta(law, rng, S=3):
    grid = law.start_grid()
    theta = grid[rng.choice(grid.shape[0], S)] + rng.normal(0, 0.05, (S, law.n_params))
    return np.clip(theta, law.lower + 0.1, law.upper - 0.1)


def test_registry_names_the_laws_of_fitting_md():
    assert {"compute", "chinchilla", "vw_additive", "vw_multiplicative", "vw_interaction",
            "clark", "joint_moe"} <= set(LAWS)
    assert get_law("chinchilla").start_grid().shape == (4500, 5)  # Epoch's grid
    for law in LAWS.values():
        assert law.nested is None or law.nested in LAWS
        assert set(law.exponents) <= set(law.natural)
        assert np.all(law.lower < law.upper)
        g = law.start_grid()
        assert np.all((g >= law.lower) & (g <= law.upper))


def test_unknown_law_names_the_choices():
    with pytest.raises(AnalysisError, match=r"law \('nope'\) is not one of compute, compute_power, chinchilla"):
        get_law("nope")


@pytest.mark.parametrize("name", sorted(LAWS))
def test_jacobian_matches_finite_differences(name):
    law = LAWS[name]
    rng = np.random.default_rng(1)
    data = _data(law, rng)
    prep = law.prepare(data)
    theta = _theta(law, rng)
    pred, J, _ = law.forward(theta, prep)
    assert pred.shape == (3, 30) and len(J) == law.n_params
    for p in range(law.n_params):
        h = 1e-6
        up, down = theta.copy(), theta.copy()
        up[:, p] += h
        down[:, p] -= h
        fd = (law.forward(up, prep)[0] - law.forward(down, prep)[0]) / (2 * h)
        np.testing.assert_allclose(np.broadcast_to(J[p], fd.shape), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("name", sorted(LAWS))
def test_objective_gradient_and_hessian_match_finite_differences(name, compiled):
    law = LAWS[name]
    rng = np.random.default_rng(2)
    data = _data(law, rng)
    theta = _theta(law, rng)
    prep = law.prepare(data)
    y = law.forward(theta[:1], prep)[0][0] + rng.normal(0, 0.05, 30)  # mix of Huber regimes
    delta = 0.03
    w = rng.uniform(0.5, 2.0, 30)
    fgh = make_objective(law, prep, y, w, delta, compiled=compiled)
    idx = np.arange(3)
    f, g, H = fgh(theta, idx)
    pred = law.forward(theta, prep)[0]
    np.testing.assert_allclose(f, (w * huber(y - pred, delta)).sum(axis=1), rtol=1e-12)
    h = 1e-6
    for p in range(law.n_params):
        up, down = theta.copy(), theta.copy()
        up[:, p] += h
        down[:, p] -= h
        fu, gu, _ = fgh(up, idx)
        fd_, gd, _ = fgh(down, idx)
        np.testing.assert_allclose(g[:, p], (fu - fd_) / (2 * h), rtol=1e-4, atol=1e-8)
        # Hessian column from gradient differences (Huber's kink can bite: loose tolerance)
        np.testing.assert_allclose(H[:, :, p], (gu - gd) / (2 * h), rtol=2e-3,
                                   atol=1e-4 * np.abs(H).max())


def test_huber_matches_scipy():
    from scipy.special import huber as scipy_huber

    r = np.linspace(-0.01, 0.01, 101)
    np.testing.assert_allclose(huber(r, 1e-3), scipy_huber(1e-3, r), rtol=1e-14)


def test_natural_parameters():
    law = get_law("chinchilla")
    nat = law.to_natural(np.array([[0.5, 6.0, 0.3, 7.0, 0.4]]))[0]
    np.testing.assert_allclose(nat, [np.exp(0.5), np.exp(6.0), 0.3, np.exp(7.0), 0.4])
    clark = get_law("clark")
    nat = clark.to_natural(np.array([[-0.08, -0.1, 0.01, 1.1, np.log(2.0), np.log(100.0)]]))[0]
    np.testing.assert_allclose(nat[4:], [2.0, 200.0])


@pytest.mark.parametrize("name", sorted(LAWS))
def test_natural_parameters_round_trip(name):
    """Every law owns both directions of its transform (no law is special-cased elsewhere)."""
    law = LAWS[name]
    theta = _theta(law, np.random.default_rng(3))
    np.testing.assert_allclose(law.from_natural(law.to_natural(theta)), theta, rtol=1e-12,
                               atol=1e-12)


DERIVED = {  # what each law derives, at a context with a target compute, n_ref and a V range
    "compute": ["loss_at_target"],
    "compute_power": ["loss_at_target"],
    "chinchilla": ["a_opt", "b_opt", "loss_at_target", "n_opt_at_target", "d_opt_at_target"],
    "vw_additive": ["a_opt", "b_opt", "loss_at_target", "n_opt_at_target", "d_opt_at_target",
                    "loss_gain_v", "v_best"],
    "vw_multiplicative": ["a_opt", "b_opt", "loss_at_target", "n_opt_at_target",
                          "d_opt_at_target", "loss_gain_v", "v_best"],
    "vw_interaction": ["n_cutoff", "loss_at_n_ref", "loss_gain_v", "v_best"],
    "vw_interaction_base": [],
    "clark": ["n_cutoff"],
    "joint_moe": [],
}


@pytest.mark.parametrize("name", sorted(LAWS))
def test_derived_quantities_by_name(name):
    law = LAWS[name]
    nat = law.to_natural(_theta(law, np.random.default_rng(4), S=5))
    ctx = DerivedContext(target_compute=1e21, n_ref=1e8, v_range=(8.0, 256.0))
    out = law.derived_quantities(law.by_name(nat), ctx)
    assert list(out) == DERIVED[name]
    assert all(np.shape(v) == (5,) for v in out.values())
    assert law.derived_quantities(law.by_name(nat), DerivedContext()).keys() <= set(out)


def test_compute_optimal_quantities_of_chinchilla():
    law = get_law("chinchilla")
    p = {"E": np.array([1.8]), "A": np.array([480.0]), "alpha": np.array([0.35]),
         "B": np.array([2100.0]), "beta": np.array([0.37])}
    out = law.derived_quantities(p, DerivedContext(target_compute=1e23))
    assert out["a_opt"][0] == pytest.approx(0.37 / 0.72)
    opt = law.optimum(p, np.array([1e23]))
    assert opt.n * opt.d * 6 == pytest.approx(1e23)
    assert out["loss_at_target"][0] == opt.loss[0]
    assert opt.loss[0] == pytest.approx(1.8 + 480.0 / opt.n[0] ** 0.35 + 2100.0 / opt.d[0] ** 0.37)


def test_nested_laws_drop_the_virtual_width_term():
    for law in LAWS.values():
        nested = law.nested_law
        if nested is None:
            continue
        assert "V" in law.variables and "V" not in nested.variables
        assert law.select({"N": "n", "D": "d", "V": "v", "C": "c"}).keys() == set(law.variables)
        assert set(nested.select(law.select({v: v.lower() for v in law.variables}))) == set(
            nested.variables)
