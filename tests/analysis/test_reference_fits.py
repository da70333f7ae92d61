"""The fitter reproduces published fits on real data (docs/FITTING.md, tests/data/README.md)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from moue.analysis import FitOptions, Holdout, fit, get_law

CHINCHILLA_VARS = {"N": "Model Size", "D": "D", "C": "Training FLOP"}


@pytest.fixture(scope="module")
def epoch_fit(chinchilla_frame):
    return fit(chinchilla_frame, law="chinchilla", loss="loss", variables=CHINCHILLA_VARS,
               n_bootstrap=1000, seed=0, holdout=Holdout(min_value=1e21))


def test_chinchilla_point_estimates(epoch_fit):
    p = epoch_fit.params
    assert p["E"] == pytest.approx(1.8172, abs=1e-3)
    assert p["alpha"] == pytest.approx(0.3473, abs=1e-3)
    assert p["beta"] == pytest.approx(0.3672, abs=1e-3)
    assert p["A"] == pytest.approx(477.8, rel=2e-3)
    assert p["B"] == pytest.approx(2143.4, rel=2e-3)
    assert epoch_fit.provenance.n_points == 240


def test_optimum_matches_a_tight_scipy_loop(chinchilla_frame, epoch_fit):
    """The reference of ``moue bench fit``: scipy L-BFGS-B (ftol=0) from an evenly spaced subset
    of the same start grid finds the same optimum to 1e-4 in every fitted parameter."""
    from moue.analysis.fitting import fit_point, prepare

    law = get_law("chinchilla")
    problem = prepare(chinchilla_frame, law=law, loss="loss",
                      variables={"N": "Model Size", "D": "D"}, options=FitOptions(engine="scipy"))
    grid = law.start_grid()
    starts = grid[np.linspace(0, grid.shape[0] - 1, 45).round().astype(int)]
    ref = fit_point(problem, starts=starts)
    assert np.max(np.abs(ref.theta - np.asarray(epoch_fit.theta))) < 1e-4
    assert ref.objective == pytest.approx(epoch_fit.diagnostics.objective, rel=1e-9)


def test_chinchilla_diagnostics(epoch_fit):
    d = epoch_fit.diagnostics
    assert d.n_starts == 4500
    assert d.status == "converged" and d.grad_norm < 1e-9
    assert d.n_best_basin > 1000  # many starts agree on the optimum
    assert d.on_bound == ()
    assert d.n_bootstrap_unconverged == 0
    assert d.objective == pytest.approx(1.01827e-3, rel=1e-5)


def test_chinchilla_bootstrap_widths(epoch_fit):
    assert epoch_fit.n_bootstrap == 1000
    assert epoch_fit.sd("alpha") == pytest.approx(0.0154, rel=0.25)
    assert epoch_fit.sd("beta") == pytest.approx(0.0210, rel=0.25)
    lo, hi = epoch_fit.ci["alpha"]
    assert lo == pytest.approx(0.317, abs=0.006) and hi == pytest.approx(0.372, abs=0.006)
    lo, hi = epoch_fit.ci["E"]
    assert lo == pytest.approx(1.768, abs=0.015) and hi == pytest.approx(1.873, abs=0.015)
    # compute-optimal exponent a = beta / (alpha + beta)
    assert epoch_fit.derived["a_opt"] == pytest.approx(0.514, abs=2e-3)
    j = list(epoch_fit.derived).index("a_opt")
    assert np.std(epoch_fit.bootstrap_derived[:, j], ddof=1) == pytest.approx(0.020, rel=0.25)
    lo, hi = epoch_fit.derived_ci["loss_at_target"]
    assert lo < epoch_fit.derived["loss_at_target"] < hi


def test_chinchilla_holdout(epoch_fit):
    h = epoch_fit.holdout
    assert (h.n_train, h.n_test) == (217, 23)
    assert h.rmse == pytest.approx(0.028, abs=2e-3)
    assert h.max_abs_error == pytest.approx(0.058, abs=3e-3)
    assert h.mape == pytest.approx(1.05, abs=0.08)
    assert h.extrapolation_ratio > 1


def test_default_scipy_tolerances_collapse_the_intervals(chinchilla_frame, epoch_fit):
    """The known pitfall: L-BFGS-B's default ftol is relative to max(|f|, 1) ~ 1 while the
    objective is ~1e-3, so refits barely move from their start and the bootstrap collapses."""
    law = get_law("chinchilla")
    pitfall = fit(chinchilla_frame, law="chinchilla", loss="loss", variables=CHINCHILLA_VARS,
                  n_bootstrap=1000, seed=0, holdout=None, starts=np.array([epoch_fit.theta]),
                  options=FitOptions(engine="scipy", scipy_tolerances="default"))
    assert law.n_params == 5
    sd_alpha, sd_beta = pitfall.sd("alpha"), pitfall.sd("beta")
    # the width check of the tight fit must fail for the pitfall fit ...
    assert not sd_alpha == pytest.approx(0.0154, rel=0.25)
    assert not sd_beta == pytest.approx(0.0210, rel=0.25)
    # ... by an order of magnitude (the README reports ~30x too narrow)
    assert sd_alpha < 0.0154 / 10


def test_clark_routing_per_router():
    from conftest import DATA

    df = pl.read_csv(DATA / "clark2022_routing.csv.gz")
    last = df.filter(pl.col("step") == pl.col("step").max().over("hyper_id"))
    sel = last.filter((pl.col("routing_frequency") == 0.5) & (pl.col("k") == 1)
                      & (pl.col("seed") == 42))
    dense = sel.filter(pl.col("router_type") == "Dense")
    assert dense.height > 0
    published = {"S-Base": (-0.082, -0.108, 0.009), "RL-R": (-0.083, -0.126, 0.012),
                 "Hash": (-0.087, -0.136, 0.012)}
    for router, (a, b, c) in published.items():
        data = pl.concat([dense, sel.filter(pl.col("router_type") == router)])
        r = fit(data, law="clark", loss="loss_validation",
                variables={"N": "dense_parameter_count", "E": "num_experts"},
                cluster="hyper_id", n_bootstrap=0, holdout=None)
        assert r.params["a"] == pytest.approx(a, abs=0.01), router
        assert r.params["b"] == pytest.approx(b, abs=0.03), router
        assert r.params["c"] == pytest.approx(c, abs=0.01), router
        assert r.params["E_max"] > r.params["E_start"]


def test_clark_huber_delta_is_in_the_units_of_its_residual():
    """The clark law's residuals are log10 L with a typical sd of 0.003: a delta of 1e-3 there acts
    like least absolute deviations, and its default (1e-2) fits typical points by least squares.
    On RL-R, held out by the largest dense size, the default extrapolates better than 1e-3."""
    from moue.analysis.fitting import Holdout
    from moue.analysis.laws import get_law
    from conftest import DATA

    assert get_law("clark").delta == 1e-2 and get_law("chinchilla").delta == 1e-3
    df = pl.read_csv(DATA / "clark2022_routing.csv.gz")
    last = df.filter(pl.col("step") == pl.col("step").max().over("hyper_id"))
    sel = last.filter((pl.col("routing_frequency") == 0.5) & (pl.col("k") == 1) & (pl.col("seed") == 42))
    data = pl.concat([sel.filter(pl.col("router_type") == "Dense"), sel.filter(pl.col("router_type") == "RL-R")])
    n_max = data["dense_parameter_count"].max()
    common = dict(law="clark", loss="loss_validation", cluster="hyper_id", n_bootstrap=0,
                  variables={"N": "dense_parameter_count", "E": "num_experts"},
                  holdout=Holdout(column="dense_parameter_count", min_value=n_max))
    default, small = fit(data, **common), fit(data, **common, delta=1e-3)
    assert default.delta == 1e-2 and small.delta == 1e-3
    assert default.holdout.rmse < 0.9 * small.holdout.rmse
