"""Prediction intervals (``moue.analysis.predict``): calibrated on a known law, honest on Epoch's
held-out Chinchilla points, on the command line (``moue fit --at``) and in the result's JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import DATA
from moue.analysis import FitResult, Holdout, Noise, Prediction, fit
from moue.analysis.predict import RANGE_TOL, Direction

CSV = DATA / "chinchilla_epoch2024.csv"
CHINCHILLA_VARS = {"N": "Model Size", "D": "D", "C": "Training FLOP"}


def _compute_law(c):
    """The known truth of the simulation: L = 1.8 + 2e6 C^-0.35."""
    return 1.8 + 2e6 * c**-0.35


def test_intervals_cover_new_runs_of_a_known_law():
    """40 studies of 30 runs each from a known law with 1% log-normal noise; each study's 95% interval
    at four new points (inside the data, at its top, 3x and 10x beyond) against a new run there: 160
    trials, so the coverage's standard error is about 1.7 points."""
    rng = np.random.default_rng(1)
    sd, at = 0.01, np.array([1e19, 1e21, 3e21, 1e22])  # the data span C = 1e17 .. 1e21
    hits = []
    for rep in range(40):
        c = 10 ** rng.uniform(17, 21, 30)
        loss = _compute_law(c) * np.exp(rng.normal(0, sd, c.size))
        r = fit({"C": c, "loss": loss}, law="compute", loss="loss", variables={"C": "C"},
                n_bootstrap=100, seed=rep, holdout=None)
        p = r.predict({"C": at}, interval=True)
        new = _compute_law(at) * np.exp(rng.normal(0, sd, at.size))
        hits.append((new >= p.lo) & (new <= p.hi))
    coverage = np.mean(hits)
    assert 0.92 <= coverage <= 0.99, coverage


@pytest.fixture(scope="module")
def epoch(chinchilla_frame):
    return fit(chinchilla_frame, law="chinchilla", loss="loss", variables=CHINCHILLA_VARS,
               n_bootstrap=1000, seed=0, holdout=Holdout(min_value=1e21))


def test_epoch_holdout_intervals(epoch):
    """Epoch's 23 points at C >= 1e21 against the intervals of the fit on the 217 below.

    The bar of issue 33 is coverage >= 0.90 with a median half-width <= 2.5x the hold-out RMSE. Every
    held-out point lies beyond the training rows' largest compute (``6ND``) and one beyond their
    largest N, so each takes the misfit of those directions (docs/FITTING.md): 20 of 23 covered
    (0.87) at 1.44x the RMSE, as with one misfit for every x (1.43x): the held-out points miss the
    law by about twice what any split of the training rows shows. This test guards those figures;
    ``test_epoch_coverage_bar`` is the bar, not yet met."""
    h = epoch.holdout
    lo, hi, obs, pred = map(np.array, (h.test_lo, h.test_hi, h.test_loss, h.test_pred))
    assert lo.shape == hi.shape == obs.shape == (23,)
    assert np.all(lo < pred) and np.all(pred < hi)
    assert h.coverage == pytest.approx(np.mean((obs >= lo) & (obs <= hi)))
    half = np.median((hi - lo) / 2)
    assert h.coverage >= 20 / 23 - 1e-9, h.coverage
    assert half <= 1.6 * h.rmse, (half, h.rmse)
    # the main fit's noise: residual scatter plus a measured misfit along each direction
    assert list(epoch.noise.directions) == ["N", "D", "6ND"]
    assert all(d.misfit_sd > 0 and d.n_folds == 5 for d in epoch.noise.directions.values())
    assert epoch.noise.n_folds == 15


@pytest.mark.xfail(strict=True, reason="issue 33's bar: 0.87 measured (docs/FITTING.md, Prediction intervals)")
def test_epoch_coverage_bar(epoch):
    h = epoch.holdout
    half = np.median((np.array(h.test_hi) - np.array(h.test_lo)) / 2)
    assert h.coverage >= 0.90 and half <= 2.5 * h.rmse


@pytest.fixture(scope="module")
def clark_by_experts():
    """Clark et al.'s routers (each with the dense runs; last step, routing frequency 0.5, k 1, seed
    42, as tests/analysis/test_reference_fits.py), fitted on fewer than 512 experts."""
    import polars as pl

    df = pl.read_csv(DATA / "clark2022_routing.csv.gz")
    last = df.filter(pl.col("step") == pl.col("step").max().over("hyper_id"))
    sel = last.filter((pl.col("routing_frequency") == 0.5) & (pl.col("k") == 1) & (pl.col("seed") == 42))
    dense = sel.filter(pl.col("router_type") == "Dense")
    return {router: fit(pl.concat([dense, sel.filter(pl.col("router_type") == router)]), law="clark",
                        loss="loss_validation", variables={"N": "dense_parameter_count", "E": "num_experts"},
                        cluster="hyper_id", n_bootstrap=1000, seed=0,
                        holdout=Holdout(column="num_experts", min_value=512))
            for router in ("S-Base",)}  # RL-R and Hash measured alike (docs/FITTING.md); one keeps the suite short


def test_clark_holdout_by_expert_count(clark_by_experts):
    """The clark law extrapolates badly in N (misfit about 5x the residual scatter) and well in the
    expert count (no misfit beyond its parameter uncertainty). The 6 points held out at 512 experts
    lie inside the training rows' N range and beyond their E, so they take E's misfit: all covered
    at 1.75-2.06x the RMSE. With N's misfit for every x they were 8.4-9.5x (docs/FITTING.md)."""
    for router, r in clark_by_experts.items():
        h = r.holdout
        half = np.median((np.array(h.test_hi) - np.array(h.test_lo)) / 2)
        assert h.n_test == 6 and h.coverage == 1.0, (router, h.coverage)
        assert 1.5 * h.rmse <= half <= 2.3 * h.rmse, (router, half / h.rmse)
        d = r.noise.directions
        assert d["N"].misfit_sd > 3 * r.noise.residual_sd and d["E"].misfit_sd < r.noise.residual_sd, (router, d)
        assert (d["E"].lo, d["E"].hi) == (1.0, 512.0) and r.noise.misfit_sd == d["N"].misfit_sd


def test_predict_interval_api(epoch):
    data = {"N": np.array([7e10, 1e9]), "D": np.array([1.4e12, 2e10])}
    p = epoch.predict(data, interval=True)
    assert isinstance(p, Prediction) and p.level == 0.95
    assert np.allclose(p.pred, epoch.predict(data))  # the point prediction is the fit's own
    assert np.all(p.lo < p.pred) and np.all(p.pred < p.hi)
    assert epoch.predict(data, samples=True).shape == (1000, 2)  # unchanged
    with pytest.raises(ValueError, match="exclusive"):
        epoch.predict(data, samples=True, interval=True)


def test_no_bootstrap_no_interval(chinchilla_frame):
    r = fit(chinchilla_frame, law="compute", loss="loss", variables={"C": "Training FLOP"},
            n_bootstrap=0, holdout=Holdout(min_value=1e21))
    assert r.holdout.test_lo == () and math.isnan(r.holdout.coverage)
    assert r.noise.n_folds == 0  # no fold refits without a bootstrap
    with pytest.raises(ValueError, match="needs a fit with a bootstrap"):
        r.predict({"C": np.array([1e22])}, interval=True)


# ----------------------------------------------------------------------------- moue fit --at

_FIT = ("--law", "chinchilla", "--loss", "loss", "--set", "N=Model Size", "--set",
        'D="Training FLOP" / (6 * "Model Size")', "--bootstrap", "200", "--no-holdout")


def test_fit_at_json_and_text(cli):
    r = cli("fit", CSV, *_FIT, "--at", "N=7e10,D=1.4e12", "--at", "D=2e10, N=1e9", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    first, second = d["predictions"]
    assert first["inputs"] == {"N": 7e10, "D": 1.4e12} and second["inputs"] == {"D": 2e10, "N": 1e9}
    for p in (first, second):
        assert p["lo"] < p["pred"] < p["hi"]
    assert 1.8 < first["pred"] < 2.1 < second["pred"]  # the larger model reaches the lower loss
    text = cli("fit", CSV, *_FIT, "--at", "N=7e10,D=1.4e12")
    assert text.exit_code == 0, text.output
    line = [ln for ln in text.stdout.splitlines() if ln.startswith("prediction at")]
    assert line == [f"prediction at N = 7e+10, D = 1.4e+12: loss {first['pred']:.4f}, 95% prediction "
                    f"interval [{first['lo']:.4f}, {first['hi']:.4f}]"]
    assert "predictions" not in json.loads(cli("fit", CSV, *_FIT, "--json").stdout.splitlines()[-1])


@pytest.mark.parametrize(("at", "message"), [
    ("N=7e10,X=3", "names 'X', which is not a variable of law chinchilla (N, D)"),
    ("N=7e10", "lacks D: law chinchilla needs N, D"),
    ("N=7e10,D=lots", "gives D='lots', which is not a number"),
    ("N=-7e10,D=1e12", "gives N=-7e10: values must be positive and finite"),
    ("N=7e10,D=0", "gives D=0: values must be positive and finite"),
    ("7e10", "must be VAR=VALUE for each variable of law chinchilla"),
])
def test_fit_at_bad_input_exits_2_before_fitting(cli, at, message):
    r = cli("fit", CSV, *_FIT, "--at", at)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --at ({at!r}) ") and message in lines[0], lines


def test_fit_at_needs_a_bootstrap(cli):
    r = cli("fit", CSV, *_FIT[:-3], "--bootstrap", "0", "--at", "N=7e10,D=1.4e12")
    assert r.exit_code == 2 and "needs a bootstrap for its interval" in r.stderr


# ----------------------------------------------------------------------------- JSON


def test_holdout_intervals_round_trip(epoch):
    back = FitResult.from_json(epoch.to_json())
    assert back.holdout == epoch.holdout and back.noise == epoch.noise
    d = epoch.to_dict()
    assert len(d["holdout"]["test_lo"]) == 23 and d["holdout"]["coverage"] == epoch.holdout.coverage
    data = {"N": np.array([7e10]), "D": np.array([1.4e12])}
    a, b = back.predict(data, interval=True), epoch.predict(data, interval=True)
    assert np.concatenate([a.pred, a.lo, a.hi]) == pytest.approx(np.concatenate([b.pred, b.lo, b.hi]), rel=1e-12)


def test_old_json_without_the_new_fields_reads_back(epoch):
    at = {"N": np.array([7e10]), "D": np.array([1.4e12])}
    d = json.loads(epoch.to_json())
    del d["noise"]["directions"]  # written before the misfit was measured per direction: one for every x
    one = FitResult.from_dict(d)
    assert one.noise.directions == {} and one.noise.misfit_at(at)[0].tolist() == [epoch.noise.misfit_sd]
    assert one.predict(at, interval=True).lo < one.predict(at)
    for key in ("test_lo", "test_hi", "coverage"):
        del d["holdout"][key]
    del d["noise"]
    old = FitResult.from_dict(d)
    assert old.holdout.test_lo == () and math.isnan(old.holdout.coverage) and old.noise is None
    assert old.params == epoch.params
    with pytest.raises(ValueError, match="no noise estimate"):
        old.predict({"N": np.array([7e10]), "D": np.array([1.4e12])}, interval=True)
    json.dumps(old.to_dict(), allow_nan=False)  # NaN coverage is written as null


def test_noise_is_a_satterthwaite_sum():
    at = {"C": np.array([1e21])}
    scale, df = Noise(residual_sd=0.006, residual_df=200, misfit_sd=0.008, n_folds=5).at(at)
    assert scale[0] == pytest.approx(0.01)
    assert df[0] == round(1e-8 / (0.006**4 / 200 + 0.008**4 / 5))
    assert Noise(residual_sd=0.006, residual_df=200).at(at)[1][0] == 200  # no misfit: the residuals' own


def test_the_misfit_of_the_directions_a_point_extrapolates_along():
    """Inside the data's range on every direction: no misfit; beyond on one: that direction's;
    beyond on several: the largest; a direction without folds borrows the largest measured; a
    result without directions (an older file) has one misfit for every point."""
    noise = Noise(residual_sd=0.003, residual_df=50, misfit_sd=0.015, n_folds=9, directions={
        "N": Direction(lo=1e7, hi=1e9, misfit_sd=0.015, n_folds=5),
        "D": Direction(lo=1e9, hi=1e11, misfit_sd=0.0, n_folds=0),
        "E": Direction(lo=1.0, hi=256.0, misfit_sd=0.002, n_folds=4)})
    n = np.array([1e8, 1e9, 1.005e9, 2e9, 1e6, 1e8, 2e9, 1e8])
    e = np.array([8.0, 256.0, 8.0, 8.0, 8.0, 512.0, 512.0, 8.0])
    d = np.array([1e10, 1e10, 1e10, 1e10, 1e10, 1e10, 1e10, 2e11])
    sd, folds = noise.misfit_at({"N": n, "D": d, "E": e})
    # inside, at the top, within RANGE_TOL of it, N above, N below, E above, both, D (unmeasured) above
    assert sd.tolist() == [0.0, 0.0, 0.0, 0.015, 0.015, 0.002, 0.015, 0.015]
    assert folds.tolist() == [0, 0, 0, 5, 5, 4, 5, 5]
    scale, df = noise.at({"N": n, "D": d, "E": e})
    assert scale[0] == 0.003 and df[0] == 50  # an interpolation: the residuals' scatter alone
    assert scale[5] == pytest.approx(math.hypot(0.003, 0.002)) and 4 < df[5] < 50
    old = Noise(residual_sd=0.003, residual_df=50, misfit_sd=0.015, n_folds=5)
    assert old.misfit_at({"N": n})[0].tolist() == [0.015] * 8


def test_6nd_is_a_direction_of_a_law_in_n_and_d(epoch):
    from moue.analysis.predict import direction_values, extrapolation_directions

    assert extrapolation_directions(("N", "D")) == ("N", "D", "6ND")
    assert extrapolation_directions(("N", "E")) == ("N", "E") and extrapolation_directions(("C",)) == ("C",)
    assert direction_values({"N": np.array([2.0]), "D": np.array([3.0])}, "6ND").tolist() == [36.0]
    # inside the N and D ranges of Epoch's data, beyond its largest compute: an extrapolation
    r = epoch.noise.directions
    n, d = 0.9 * r["N"].hi, 0.9 * r["D"].hi
    assert 6 * n * d > r["6ND"].hi * (1 + RANGE_TOL)
    sd, _ = epoch.noise.misfit_at({"N": np.array([n, r["N"].hi / 100]), "D": np.array([d, r["D"].hi / 100])})
    assert sd[0] == r["6ND"].misfit_sd > 0 and sd[1] == 0


# ----------------------------------------------------------------------------- the report


def _ladder(sizes, seed=0):
    """Final points of a ladder at 20 tokens per parameter, on moue's own columns."""
    from moue.analysis import DEFAULT_COLUMNS

    rng = np.random.default_rng(seed)
    n = np.repeat(np.asarray(sizes, dtype=float), 3)  # three seeds a size
    d = 20.0 * n
    c = 6.0 * n * d
    loss = _compute_law(c * 1e6) * np.exp(rng.normal(0, 0.005, n.size))
    return {DEFAULT_COLUMNS["N"]: n, DEFAULT_COLUMNS["D"]: d, DEFAULT_COLUMNS["C"]: c, "final/val_loss": loss}


def test_next_prediction_and_the_report_summary(tmp_path):
    from moue.analysis import DEFAULT_COLUMNS
    from moue.analysis.predict import next_prediction
    from moue.analysis.report import ReportResult, summary_json

    frame = _ladder([1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6])
    r = fit(frame, law="compute", n_bootstrap=100, seed=0)
    nxt = next_prediction(r, frame, columns=DEFAULT_COLUMNS)
    c_max = frame[DEFAULT_COLUMNS["C"]].max()
    assert nxt.what == "the next size up the ladder (N x2)" and nxt.inputs == {"C": pytest.approx(4 * c_max)}
    assert nxt.lo < nxt.pred < nxt.hi and nxt.pred == pytest.approx(r.predict({"C": np.array([4 * c_max])})[0])
    assert nxt.sentence("compute").startswith(f"compute predicts loss {nxt.pred:.4g} (95% prediction interval")
    one_size = {k: v[-3:] for k, v in frame.items()}  # no ladder: 10x the largest compute
    assert next_prediction(r, one_size, columns=DEFAULT_COLUMNS).inputs == {"C": pytest.approx(10 * c_max)}

    res = ReportResult(path=tmp_path / "r.html", fits={"compute": r}, tests={}, skipped={}, figures=(), notes=(),
                       logged_to=(), headline="compute", next_prediction=nxt)
    d = json.loads(json.dumps(summary_json(res), allow_nan=False))
    assert d["next_prediction"]["inputs"] == {"C": pytest.approx(4 * c_max)} and d["next_prediction"]["what"] == nxt.what
    h = d["laws"]["compute"]["holdout"]
    assert len(h["test_lo"]) == len(h["test_hi"]) == len(h["test_loss"]) == len(h["test_pred"]) == h["n"]
    assert h["coverage"] == r.holdout.coverage
