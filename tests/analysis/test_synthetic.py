"""Data drawn from a known virtual-width law: recovery, and the likelihood-ratio test's verdicts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moue.analysis import fit, likelihood_ratio_test
from moue.analysis.nested import huber_loglik
from study_log import TRUE, true_loss

VARS = {"N": "N", "D": "D", "V": "V"}


def _frame(params, *, seed, noise=0.004):
    import polars as pl

    rng = np.random.default_rng(seed)
    rows = list(itertools.product([2e6, 5e6, 1.2e7, 3e7, 8e7], [2e8, 6e8, 2e9],
                                  [16.0, 32.0, 64.0, 128.0, 256.0]))
    N, D, V = (np.array(c) for c in zip(*rows))
    loss = true_loss(N, D, V, params) * np.exp(noise * rng.standard_normal(N.size))
    return pl.DataFrame({"N": N, "D": D, "V": V, "loss": loss,
                         "run_id": [f"r{i:03d}" for i in range(N.size)]})


@pytest.fixture(scope="module")
def with_v():
    return _frame(TRUE, seed=3)


@pytest.fixture(scope="module")
def without_v():
    return _frame({**TRUE, "gamma": 0.0}, seed=4)


def test_exponents_recovered_inside_their_intervals(with_v):
    r = fit(with_v, law="vw_multiplicative", loss="loss", variables=VARS, n_bootstrap=1000,
            seed=0, holdout=None)
    for name in ("alpha", "gamma", "beta"):
        lo, hi = r.ci[name]
        assert lo < TRUE[name] < hi, (name, r.params[name], r.ci[name])
        assert hi - lo < 0.2  # and the interval is informative
    assert r.params["gamma"] == pytest.approx(TRUE["gamma"], abs=0.03)
    assert r.diagnostics.status in ("converged", "stalled")
    assert r.provenance.n_clusters == 75


def test_fit_is_its_public_stages(with_v):
    """prepare -> fit_point -> fit_bootstrap -> fit_noise -> fit_holdout -> assemble is exactly ``fit``."""
    import warnings

    from moue.analysis import Holdout, assemble, fit_bootstrap, fit_holdout, fit_noise, fit_point, prepare

    kw = dict(law="vw_multiplicative", loss="loss", variables=VARS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = fit(with_v, **kw, n_bootstrap=50, seed=2)
    # the fit's notes are in its diagnostics, never warned
    assert not [w for w in caught if "intervals are rough" in str(w.message)]
    problem = prepare(with_v, **kw)
    point = fit_point(problem)
    samples = fit_bootstrap(problem, point, n_bootstrap=50, seed=2)
    held = fit_holdout(problem, Holdout(), n_bootstrap=50, seed=2)  # bootstrapped like the main fit
    staged = assemble(problem, point, samples, held, noise=fit_noise(problem, point, n_bootstrap=50, seed=2),
                      seed=2)
    assert staged.to_json() == whole.to_json()
    assert samples.natural.shape == (50, 6) and point.objective == whole.diagnostics.objective
    assert whole.diagnostics.warnings[0] == "n_bootstrap=50 < 1000: intervals are rough"
    assert whole.notes[0] == "fit vw_multiplicative: n_bootstrap=50 < 1000: intervals are rough"


def test_likelihood_ratio_prefers_the_v_law_when_v_matters(with_v):
    t = likelihood_ratio_test(with_v, law="vw_multiplicative", loss="loss", variables=VARS)
    assert t.nested == "chinchilla" and t.df == 1
    assert t.p_value < 1e-6 and t.aic < t.aic_nested and t.bic < t.bic_nested
    assert t.prefers_law


def test_likelihood_ratio_does_not_prefer_v_without_an_effect(without_v):
    t = likelihood_ratio_test(without_v, law="vw_multiplicative", loss="loss", variables=VARS)
    assert t.p_value > 0.05
    assert not t.prefers_law
    t2 = likelihood_ratio_test(without_v, law="vw_multiplicative", loss="loss", variables=VARS,
                               likelihood="gaussian")
    assert t2.p_value > 0.05


def test_huber_likelihood_scale_is_maximised():
    rng = np.random.default_rng(0)
    r = 0.01 * rng.standard_normal(500)
    ll = huber_loglik(r, 1e-3)
    # a Gaussian with the right scale does about as well; the Huber density's maximum is finite
    gauss = -0.5 * r.size * (np.log(2 * np.pi * np.mean(r * r)) + 1)
    assert np.isfinite(ll) and abs(ll - gauss) < 0.05 * abs(gauss)


def test_additive_law_recovers_its_own_truth():
    truth = {"E": 1.6, "A": 60.0, "alpha": 0.32, "B": 300.0, "beta": 0.30, "G": 1.0,
             "gamma": 0.5}

    def additive(N, D, V, p):
        return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"] + p["G"] / V ** p[
            "gamma"]

    rng = np.random.default_rng(5)
    base = _frame(TRUE, seed=5)
    N, D, V = (base.get_column(c).to_numpy() for c in ("N", "D", "V"))
    loss = additive(N, D, V, truth) * np.exp(0.004 * rng.standard_normal(N.size))
    frame = base.with_columns(loss=loss)
    r = fit(frame, law="vw_additive", loss="loss", variables=VARS, n_bootstrap=200, seed=0,
            holdout=None)
    assert r.params["gamma"] == pytest.approx(0.5, abs=0.1)
    lo, hi = r.ci["gamma"]
    assert lo < 0.5 < hi
    assert {"a_opt", "loss_at_target", "loss_gain_v", "v_best"} <= set(r.derived)
    assert r.derived["v_best"] == pytest.approx(256.0)  # monotone in V: the largest observed
    assert r.derived["loss_gain_v"] > 0
