"""Decisions (moue.analysis.decide): verdicts, minimum detectable effects and the pairs that would
decide, checked against textbook values and against simulations with a known truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from moue.analysis.decide import (
    ComparisonSpec,
    bootstrap_decision,
    comparison_specs,
    decide,
    paired_decision,
    paired_mde,
    paired_power,
    pairs_needed,
)
from moue.analysis.errors import AnalysisError


@pytest.mark.parametrize(("effect_size", "n"), [(0.2, 199), (0.5, 34), (0.8, 15), (1.0, 10)])
def test_pairs_needed_match_the_textbook(effect_size, n):
    # Cohen (1988), Table 2.4.1, and G*Power's "means: difference from constant (matched pairs)":
    # 80% power at 5% two-sided needs 199, 34, 15 and 10 pairs for d = 0.2, 0.5, 0.8 and 1.0
    assert pairs_needed(1.0, effect_size) == n
    assert paired_power(n, effect_size) >= 0.80 > paired_power(n - 1, effect_size)


def test_power_is_the_alpha_at_no_effect_and_the_mde_has_80_percent():
    assert paired_power(12, 0.0) == pytest.approx(0.05, abs=1e-12)
    mde = paired_mde(12, 2.0)
    assert paired_power(12, mde / 2.0) == pytest.approx(0.80, abs=1e-8)
    # the normal-approximation formula is a close lower bound: the t makes it slightly larger
    approx = (stats.t.ppf(0.975, 11) + stats.t.ppf(0.80, 11)) * 2.0 / math.sqrt(12)
    assert approx * 0.97 < mde < approx * 1.05


def test_verdict_rules():
    assert decide(1.0, (0.2, 1.8), 1.0) == "detected"
    assert decide(-1.0, (-1.8, -0.1), 1.0) == "detected"
    assert decide(0.1, (-0.5, 0.7), 1.0) == "ruled_out"
    assert decide(0.1, (-1.2, 0.7), 1.0) == "undecided"
    assert decide(0.1, (-0.5, 0.7), 0.5) == "undecided"  # the margin is exclusive
    assert decide(0.1, (math.nan, math.nan), 1.0) == "undecided"


def test_the_issues_example_quickstart_moue_vs_layerwise():
    # -0.54% [-3.85, +2.77] on 4 pairs (studies/LOG.md): sd of a pair's difference from the interval
    half = (2.77 + 3.85) / 2
    sd = half * 2 / stats.t.ppf(0.975, 3)
    d = np.array([-1.0, 1.0, -1.0, 1.0]) * sd * math.sqrt(3 / 4) - 0.54  # mean -0.54, sd as measured
    dec = paired_decision(d, margin=1.0)
    assert dec.ci == pytest.approx((-3.85, 2.77), abs=1e-9)
    assert dec.verdict == "undecided"
    assert 4.0 < dec.mde < 5.0  # "this design detects differences of about 4.2% or more"
    assert 30 <= dec.needed <= 40  # "about 36 pairs would decide at 1%"
    words = dec.words()
    assert words.startswith("undecided (-0.54% [-3.85, +2.77], 4 pairs)")
    assert f"about {dec.needed} pairs ({dec.needed - 4} more) would decide at 1%" in words


def test_two_pairs_have_an_mde():
    # one degree of freedom: scipy's non-central t gives NaN for the wrong-sign tail there
    assert paired_power(2, 8.0) == pytest.approx(stats.nct.sf(stats.t.ppf(0.975, 1), 1, 8.0 * math.sqrt(2)))
    dec = paired_decision([-5.65, -5.92], margin=1.0)
    assert dec.verdict == "detected" and math.isfinite(dec.mde)
    assert paired_power(2, paired_mde(2, 1.0)) == pytest.approx(0.80, abs=1e-8)


def test_one_pair_says_the_noise_is_unknown():
    dec = paired_decision([1.5], margin=1.0)
    assert dec.verdict == "undecided" and math.isnan(dec.mde) and dec.needed is None
    assert "unknown" in dec.words()
    with pytest.raises(AnalysisError):
        paired_decision([], margin=1.0)


def _simulate(true_effect, sd, n, reps, margin=1.0, seed=0):
    rng = np.random.default_rng(seed)
    verdicts = [paired_decision(rng.normal(true_effect, sd, n), margin=margin).verdict for _ in range(reps)]
    return {v: verdicts.count(v) / reps for v in ("detected", "ruled_out", "undecided")}


def test_simulation_false_positives_and_power_at_the_mde():
    # known truth: no effect -> 'detected' in 5% of studies; an effect of the MDE -> in 80%
    reps, sd, n = 4000, 2.0, 6
    null = _simulate(0.0, sd, n, reps, seed=1)
    assert abs(null["detected"] - 0.05) < 3 * math.sqrt(0.05 * 0.95 / reps)
    at_mde = _simulate(paired_mde(n, sd), sd, n, reps, seed=2)
    assert abs(at_mde["detected"] - 0.80) < 3 * math.sqrt(0.8 * 0.2 / reps)


def test_simulation_needed_pairs_decide_at_the_margin():
    # the measured noise of a small pilot says how many pairs would detect the margin: with that
    # many, an effect of the margin is detected 80% of the time
    sd, margin, reps = 1.5, 1.0, 3000
    n = pairs_needed(sd, margin)
    sim = _simulate(margin, sd, n, reps, margin=margin, seed=3)
    assert abs(sim["detected"] - 0.80) < 3 * math.sqrt(0.8 * 0.2 / reps)


def test_simulation_equivalence_keeps_its_error_rate():
    # ruled_out is the TOST at 2.5% per side: a true effect exactly at the margin is ruled out at
    # most 2.5% of the time; a true null with little noise is ruled out in the 95% of studies that
    # do not (falsely) detect it
    reps = 4000
    at_margin = _simulate(1.0, 1.0, 20, reps, margin=1.0, seed=4)
    assert at_margin["ruled_out"] <= 0.025 + 3 * math.sqrt(0.025 * 0.975 / reps)
    null = _simulate(0.0, 0.5, 20, reps, margin=1.0, seed=5)
    assert abs(null["ruled_out"] - 0.95) < 3 * math.sqrt(0.05 * 0.95 / reps)
    assert null["undecided"] < 0.002


def test_bootstrap_decision_and_the_runs_that_would_decide():
    rng = np.random.default_rng(0)
    samples = rng.normal(-0.8, 1.0, 20000)
    dec = bootstrap_decision(-0.8, samples, n_runs=12, margin=1.0)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.80)
    assert dec.mde == pytest.approx(z * 1.0, rel=0.02)
    assert dec.ci == pytest.approx((-0.8 - 1.96, -0.8 + 1.96), abs=0.05)
    assert dec.verdict == "undecided" and dec.unit == "runs"
    assert dec.needed == math.ceil(12 * (dec.mde / 1.0) ** 2)
    forced = bootstrap_decision(-5.0, rng.normal(-5.0, 0.1, 1000), n_runs=12, why="its law is not identified")
    assert forced.verdict == "undecided" and "not identified" in forced.words()
    assert bootstrap_decision(-5.0, rng.normal(-5.0, 0.1, 1000), n_runs=12).verdict == "detected"


def test_comparison_specs_name_the_bad_field():
    (spec,) = comparison_specs([{"name": "experts", "variant": ["model.pool_size"], "reference": 4,
                                 "pair": ["train.seed"], "label": {"4": "2 experts"}}])
    assert spec == ComparisonSpec(name="experts", variant=("model.pool_size",), reference="4", pair=("train.seed",),
                                  label={"4": "2 experts"})
    bad = [
        ({"variant": ["a"], "reference": "x"}, "analysis.comparisons[0].name"),
        ({"name": "n", "variant": [], "reference": "x"}, "analysis.comparisons[0].variant"),
        ({"name": "n", "variant": ["a"], "reference": "x", "pair": [1]}, "analysis.comparisons[0].pair"),
        ({"name": "n", "variant": ["a"], "reference": "x", "colour": 1}, "analysis.comparisons[0].colour"),
        ({"name": "n", "variant": ["a"], "reference": True}, "analysis.comparisons[0].reference"),
        ({"name": "n", "variant": ["a"], "reference": "x", "label": {"x": 1}}, "analysis.comparisons[0].label"),
    ]
    for table, field in bad:
        with pytest.raises(AnalysisError) as e:
            comparison_specs([table])
        assert e.value.field == field
    with pytest.raises(AnalysisError) as e:
        comparison_specs([{"name": "n", "variant": ["a"], "reference": "x"}] * 2)
    assert e.value.field == "analysis.comparisons[1].name"


def test_the_report_decides_families_comparisons_and_the_v_term(logged_study, tmp_path):
    from mlflow import MlflowClient

    from moue.analysis.report import summary_json, write_report
    from moue.tracking_contract import DECISION_TAG_PREFIX

    uri, exp, pid, _ = logged_study
    spec = ComparisonSpec(name="window 4 vs 16", variant=("model.window",), reference="16",
                          pair=("model.d_model", "final/tokens"))
    missing = ComparisonSpec(name="no such column", variant=("model.window",), reference="16", pair=("nope",))
    res = write_report(exp, tracking_uri=uri, output=tmp_path / "r.html", laws=["vw_multiplicative"],
                       n_bootstrap=100, margin_pct=2.0, comparisons=[spec, missing])
    out = json.loads(json.dumps(summary_json(res), allow_nan=False))
    assert out["margin_pct"] == 2.0
    names = {c["name"] for c in out["comparisons"]}
    assert names == {f"window 4 vs 16 ({w})" for w in ("2", "4", "8")}
    for c in out["comparisons"]:
        assert c["verdict"] in ("detected", "ruled_out", "undecided") and c["margin_pct"] == 2.0
        assert c["n_pairs"] >= 10 and c["mde_pct"] > 0
        assert ("needed_pairs" in c) == (c["verdict"] == "undecided")
    assert any("no such column" in n for n in res.notes)
    v = out["laws"]["vw_multiplicative"]["v_term"]
    assert {"verdict", "mde_pct", "margin_pct", "estimate_pct", "ci_pct", "n_runs"} <= set(v)
    if not out["laws"]["vw_multiplicative"]["identified"]:
        assert v["verdict"] == "undecided" and "needed_runs" in v
    lines = out["decisions"]
    assert any(line.startswith("window 4 vs 16 (2): ") for line in lines)
    page = (tmp_path / "r.html").read_text()
    assert "Decisions" in page and "this design detects differences of" in page
    assert "<th>detectable (80% power)</th>" in page and "window 4 vs 16 (2)</td>" in page  # the table
    assert "comparison &#x27;no such column&#x27; not made" in page
    tags = MlflowClient(uri).get_run(pid).data.tags
    decided = {k: v for k, v in tags.items() if k.startswith(DECISION_TAG_PREFIX)}
    # each verdict in plain words on the parent run (other tests of this session-wide study may add
    # tags of their own laws; the study comparisons are this test's alone)
    ours = {v for v in decided.values() if v.startswith("window 4 vs 16 (")}
    assert ours == {line for line in lines if line.startswith("window 4 vs 16 (")} and len(ours) == 3
    assert decided[DECISION_TAG_PREFIX + "window 4 vs 16 _2_"].startswith("window 4 vs 16 (2): ")
    assert DECISION_TAG_PREFIX + "virtual width in vw_multiplicative" in decided


def test_a_study_spec_carries_its_margin_and_comparisons(tmp_path):
    from pathlib import Path

    from moue.studies.spec import load_study

    root = Path(__file__).resolve().parents[2]
    text = (root / "studies" / "smoke.toml").read_text().replace("[analysis]", "[analysis]\nmargin_pct = 0.5")
    text += '\n[[analysis.comparisons]]\nname = "top-k"\nvariant = ["model.top_k"]\nreference = 1\npair = ["train.seed"]\n'
    (tmp_path / "s.toml").write_text(text)
    study = load_study(tmp_path / "s.toml")
    assert study.margin_pct == 0.5
    assert study.comparisons == (ComparisonSpec(name="top-k", variant=("model.top_k",), reference="1",
                                                pair=("train.seed",)),)
    assert load_study(root / "studies" / "smoke.toml").margin_pct == 1.0


def _vw_points(gamma, seed=0):
    rng = np.random.default_rng(seed)
    N, D, V = (a.ravel() for a in np.meshgrid([1e6, 2e6, 4e6, 8e6, 1.6e7], [2e8, 8e8, 3.2e9], [8.0, 32.0, 128.0]))

    def law(N, D, V):
        return 1.8 + 400.0 / (N**0.34 * V**gamma) + 2000.0 / D**0.37

    loss = law(N, D, V) * np.exp(rng.normal(0, 0.002, N.size))
    return {"N": N, "D": D, "V": V, "loss": loss, "run_id": [str(i) for i in range(N.size)]}, law


@pytest.mark.parametrize("gamma", [0.15, 0.0])
def test_v_term_decision_on_data_with_a_known_virtual_width_effect(gamma):
    from moue.analysis import fit
    from moue.analysis.decide import v_effect

    data, law = _vw_points(gamma)
    r = fit(data, law="vw_multiplicative", loss="loss", variables={"N": "N", "D": "D", "V": "V"},
            n_bootstrap=200, seed=0)
    N, D = np.median(data["N"]), np.median(data["D"])
    truth = 100 * (law(N, D, 128.0) - law(N, D, 8.0)) / law(N, D, 8.0)
    dec = v_effect(r, {k: np.asarray(data[k]) for k in ("N", "D", "V")}, margin=1.0)
    if gamma > 0:
        assert truth < -3 and dec.verdict == "detected", dec.words()
        assert dec.ci[0] < truth < dec.ci[1] and dec.estimate == pytest.approx(truth, abs=0.5)
        assert 0 < dec.mde < abs(truth)
    else:  # no effect: gamma's lower bound is 0, where the estimate sits; no MDE from a piled-up bootstrap
        assert dec.verdict != "detected"
        assert dec.verdict == "ruled_out" or "bound" in dec.why, dec.words()
