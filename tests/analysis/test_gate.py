"""The regression gate: paired bootstrap for the same runs, Wald test otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moue.analysis import AnalysisError, compare, fit, read_baseline, write_baseline

VARS = {"N": "N", "D": "D"}


def _frame(alpha, *, seed, prefix="r", corpus="c1"):
    import polars as pl

    rng = np.random.default_rng(seed)
    N = np.repeat([2e6, 5e6, 1.2e7, 3e7, 8e7, 2e8], 5)
    D = np.tile([2e8, 6e8, 2e9, 6e9, 2e10], 6)
    loss = (1.7 + 80.0 / N**alpha + 400.0 / D**0.3) * np.exp(0.003 * rng.standard_normal(N.size))
    return pl.DataFrame({"N": N, "D": D, "loss": loss,
                         "run_id": [f"{prefix}{i:02d}" for i in range(N.size)],
                         "corpus_fingerprint": [corpus] * N.size})


def _fit(frame, **kw):
    return fit(frame, law="chinchilla", loss="loss", variables=VARS, n_bootstrap=1000, seed=0,
               holdout=None, **kw)


@pytest.fixture(scope="module")
def base():
    return _fit(_frame(0.34, seed=1))


def test_identical_data_passes_with_a_paired_interval_of_zero(base):
    again = _fit(_frame(0.34, seed=1))
    g = compare(base, again)
    assert g.method == "paired" and g.passed
    assert [r.parameter for r in g.rows] == ["alpha", "beta"]
    assert all(r.interval == (0.0, 0.0) and r.verdict == "pass" for r in g.rows)


def test_shifted_exponent_fails_paired(base):
    shifted = _fit(_frame(0.40, seed=1))  # same runs (same ids and resamples), steeper in N
    g = compare(base, shifted)
    assert g.method == "paired" and not g.passed
    alpha = next(r for r in g.rows if r.parameter == "alpha")
    assert alpha.verdict == "FAIL" and alpha.interval[0] > 0


def test_other_runs_use_wald(base):
    same_law = _fit(_frame(0.34, seed=2, prefix="s"))
    g = compare(base, same_law)
    assert g.method == "wald" and g.passed and g.joint_p > 0.01
    shifted = _fit(_frame(0.26, seed=2, prefix="s"))
    g = compare(base, shifted)
    assert g.method == "wald" and not g.passed and g.joint_p < 1e-3
    alpha = next(r for r in g.rows if r.parameter == "alpha")
    assert alpha.p_value < 0.05 and alpha.verdict == "FAIL"


def test_incompatible_fits_are_unusable(base):
    other_corpus = _fit(_frame(0.34, seed=1, corpus="c2"))
    with pytest.raises(AnalysisError, match=r"corpus_fingerprint \('c2'\) differs"):
        compare(base, other_corpus)
    no_boot = fit(_frame(0.34, seed=1), law="chinchilla", loss="loss", variables=VARS,
                  n_bootstrap=0, holdout=None)
    with pytest.raises(AnalysisError, match="n_bootstrap"):
        compare(base, no_boot)


def test_baseline_round_trip(base, tmp_path):
    path = write_baseline(tmp_path / "b.json", experiment="exp", fits={"chinchilla": base})
    b = read_baseline(path)
    r = b.fits["chinchilla"]
    assert b.experiment == "exp"
    assert r.params == base.params and r.ci == base.ci and r.theta == base.theta
    np.testing.assert_array_equal(r.bootstrap, base.bootstrap)
    assert r.provenance == base.provenance and r.diagnostics == base.diagnostics
    assert compare(r, base).passed
    doc = json.loads(path.read_text())
    assert doc["fits"]["chinchilla"]["params"]["alpha"] == base.params["alpha"]


def test_unusable_baselines(tmp_path):
    with pytest.raises(AnalysisError, match="does not exist"):
        read_baseline(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnalysisError, match="is not JSON"):
        read_baseline(bad)
    bad.write_text('{"kind": "something"}')
    with pytest.raises(AnalysisError, match="not a moue baseline"):
        read_baseline(bad)


def _power_frame(alpha, *, seed, prefix="p"):
    import polars as pl

    rng = np.random.default_rng(seed)
    C = np.geomspace(1e9, 1e13, 24)
    loss = 30.0 * C**-alpha * np.exp(0.01 * rng.standard_normal(C.size))
    return pl.DataFrame({"C": C, "loss": loss, "run_id": [f"{prefix}{i:02d}" for i in range(C.size)],
                         "corpus_fingerprint": ["c1"] * C.size})


def test_compute_power_gate_round_trip_and_power(tmp_path):
    """The CI gate's law (``L = A C^-alpha``): recovers its exponent, survives the baseline file,
    and as a gate (Wald, other runs) raises few false alarms on reruns with new noise and catches
    a slope moved by 10 bootstrap sd of the estimate nearly always (Huber with a small delta is
    close to L1 here, so single reruns' bootstrap spreads vary and the power is below a Gaussian
    Wald test's)."""
    kw = dict(law="compute_power", loss="loss", variables={"C": "C"}, n_bootstrap=200, seed=0, holdout=None)
    b = fit(_power_frame(0.07, seed=1), **kw)
    assert b.ci["alpha"][0] < 0.07 < b.ci["alpha"][1] and b.ci["alpha"][1] - b.ci["alpha"][0] < 0.01
    r = read_baseline(write_baseline(tmp_path / "p.json", experiment="exp", fits={"compute_power": b}))
    restored = r.fits["compute_power"]
    assert restored.bootstrap_derived.shape == b.bootstrap_derived.shape
    reruns = range(2, 22)
    false_alarms = sum(not compare(restored, fit(_power_frame(0.07, seed=s, prefix="q"), **kw)).passed
                       for s in reruns)
    moved = 0.07 + 10 * b.sd("alpha")
    detected = sum(not compare(restored, fit(_power_frame(moved, seed=s, prefix="q"), **kw)).passed
                   for s in reruns)
    assert false_alarms <= 3 and detected >= 18, (false_alarms, detected)


def test_baseline_with_no_derived_quantities_reads_back(base, tmp_path):
    """A fit whose law has no derived quantities (bootstrap_derived of shape (B, 0)) round-trips."""
    import dataclasses

    bare = dataclasses.replace(base, derived={}, derived_ci={},
                               bootstrap_derived=np.empty((base.bootstrap.shape[0], 0)))
    r = read_baseline(write_baseline(tmp_path / "bare.json", experiment="exp", fits={"chinchilla": bare}))
    assert r.fits["chinchilla"].bootstrap_derived.shape == (base.bootstrap.shape[0], 0)
    assert compare(r.fits["chinchilla"], base).passed


def test_the_gate_s_last_line_agrees_with_its_rows() -> None:
    """The summary counts the rows the table shows: a law with one failing exponent is a regression
    whose count says so; all rows passing is a pass with the same count."""
    from moue.analysis.cli import gate_summary
    from moue.analysis.gate import GateResult, GateRow

    def row(name: str, passed: bool) -> GateRow:
        return GateRow(parameter=name, baseline=0.3, new=0.3 if passed else 0.5, difference=0.0 if passed else 0.2,
                       interval=(-0.01, 0.01) if passed else (0.1, 0.3), method="wald", p_value=None, passed=passed)

    ok = GateResult(law="chinchilla", method="wald", level=0.95, rows=(row("a", True), row("b", True)))
    bad = GateResult(law="compute", method="wald", level=0.95, rows=(row("alpha", False),))
    assert gate_summary([ok]) == "pass: 2 of 2 exponent(s) within their interval"
    assert gate_summary([ok, bad]) == "regression in compute: 2 of 3 exponent(s) within their interval"
