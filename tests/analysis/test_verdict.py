"""Every fit says whether it identifies its law (moue.analysis.verdict), and the report, its JSON and
the gate act on it."""

from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest

from moue.analysis.fitting import fit
from moue.analysis.verdict import MAX_HOLDOUT_MAPE, verdict


@pytest.fixture(scope="module")
def chinchilla_fit(chinchilla_frame):
    return fit(chinchilla_frame, law="chinchilla", loss="loss", variables={"N": "Model Size", "D": "D"},
               n_bootstrap=200, seed=0)


def test_a_well_posed_published_fit_is_identified(chinchilla_fit):
    v = chinchilla_fit.verdict
    assert v.identified and v.reasons == () and v.exponent_reasons == ()
    h = chinchilla_fit.holdout
    assert h is not None and h.n_test >= 3  # the default hold-out holds out at least 3 points
    d = chinchilla_fit.to_dict()
    assert d["identified"] is True and d["reasons"] == []
    assert chinchilla_fit.provenance.levels["N"] > 3 and set(chinchilla_fit.provenance.levels) == {"N", "D"}


def test_each_reason_is_found(chinchilla_fit):
    r = chinchilla_fit
    on_bound = dataclasses.replace(r, diagnostics=dataclasses.replace(r.diagnostics, on_bound=("alpha",)))
    assert any("alpha = " in x and "on a bound" in x for x in verdict(on_bound).exponent_reasons)
    wide = dataclasses.replace(r, ci={**r.ci, "beta": (-0.5, 2.0)})
    assert any("beta's 95% interval" in x for x in verdict(wide).exponent_reasons)
    few = dataclasses.replace(r, provenance=dataclasses.replace(r.provenance, levels={"N": 2, "D": 9}))
    assert any("N has 2 distinct values" in x for x in verdict(few).exponent_reasons)
    bad = dataclasses.replace(r, diagnostics=dataclasses.replace(r.diagnostics, n_bootstrap_on_bound=30))
    assert any("30 of 200 bootstrap resamples" in x for x in verdict(bad).exponent_reasons)
    h = r.holdout
    poor = dataclasses.replace(r, holdout=dataclasses.replace(h, mape=MAX_HOLDOUT_MAPE + 1))
    v = verdict(poor)
    assert not v.identified and v.exponent_reasons == () and any("hold-out MAPE" in x for x in v.reasons)
    tiny = dataclasses.replace(r, holdout=dataclasses.replace(h, n_test=1))
    assert any("the hold-out has 1 point " in x for x in verdict(tiny).reasons)
    assert "no hold-out evaluation" in verdict(dataclasses.replace(r, holdout=None)).reasons


def test_an_unidentified_fit_on_real_data_says_why():
    """Two budgets of Epoch's data: D takes few distinct values per N, the additive law's exponents
    are left wide; the verdict is not identified and names the exponents."""
    from conftest import DATA

    d = pl.read_csv(DATA / "chinchilla_epoch2024.csv")
    d = d.filter((pl.col("Training FLOP") > 9e18) & (pl.col("Training FLOP") < 1.1e19))
    d = d.with_columns((pl.col("Training FLOP") / (6 * pl.col("Model Size"))).alias("D"))
    r = fit(d, law="chinchilla", loss="loss", variables={"N": "Model Size", "D": "D"}, n_bootstrap=100)
    v = r.verdict
    assert not v.identified and v.exponent_reasons
    assert r.to_dict()["identified"] is False


def test_report_json_and_html_show_verdicts(cli, logged_study, tmp_path):
    uri, exp, _, _ = logged_study
    out = tmp_path / "r.html"
    r = cli("report", exp, "--tracking-uri", uri, "-o", out, "--bootstrap", "100", "--law", "compute",
            "--law", "vw_interaction", "--no-log-artifact", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)  # stdout is the one JSON object
    assert set(d) >= {"headline", "laws"}
    for name, law in d["laws"].items():
        assert set(law) >= {"identified", "reasons", "params", "ci", "exponents", "holdout"}
        assert set(law["holdout"]) >= {"rmse", "mape", "n"}
        assert law["identified"] == (not law["reasons"])
        assert all(len(b) == 2 for b in law["ci"].values())
    unidentified = [n for n, law in d["laws"].items() if not law["identified"]]
    assert d["headline"] not in unidentified
    page = out.read_text()
    assert "<h2>Summary</h2>" in page
    for name in unidentified:
        assert f"{name} (not identified)" in page and 'class="unidentified"' in page
    if d["headline"] is None:
        assert "No law is identified" in page
    # without --json, the fitted values print as moue run prints them: results first, the others apart
    r = cli("report", exp, "--tracking-uri", uri, "-o", out, "--bootstrap", "100", "--law", "compute",
            "--law", "vw_interaction", "--no-log-artifact")
    assert r.exit_code == 0, r.output
    for name in d["laws"]:
        assert f"{name}: " in r.stdout and "(95% bootstrap intervals)" in r.stdout
    for name in unidentified:
        assert f"not identified, not a result: {name}: " in r.stdout
