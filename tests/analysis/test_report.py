"""Report: figure data computed without a browser; the page rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from moue.analysis import figures as F
from moue.analysis import fit, load_runs

DATA = Path(__file__).resolve().parents[1] / "data"

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
FIGURES = ("loss_vs_compute", "loss_vs_virtual_width", "residuals", "holdout", "bootstrap",
           "parallel", "importance")


@pytest.fixture(scope="module")
def study(logged_study):
    uri, exp, _, _ = logged_study
    frame = load_runs(exp, tracking_uri=uri).frame
    fits = {law: fit(frame, law=law, n_bootstrap=100, seed=0)
            for law in ("compute", "vw_multiplicative")}
    return frame, fits


def test_loss_vs_compute_data(study):
    frame, fits = study
    labels = F.architecture_labels(frame)
    assert sorted(set(labels)) == ["w=16", "w=2", "w=4", "w=8"]  # only the window varies
    d = F.loss_vs_compute_data(frame, loss="final/val_loss", compute="final/flops", fits=fits,
                               labels=labels)
    assert len(d.points) == 4 and sum(len(s.x) for s in d.points) == frame.height
    # the compute law's curve over the fitted compute, then a decade beyond it marked as extrapolated
    # (chinchilla's frontier only when it is fitted); an unidentified law is named so
    fitted, beyond = d.curves
    assert beyond.name.endswith("(extrapolated)") and not fitted.name.endswith("(extrapolated)")
    x = frame["final/flops"].to_numpy()
    assert fitted.x[0] == pytest.approx(x.min()) and fitted.x[-1] == pytest.approx(x.max())
    assert beyond.x[0] == pytest.approx(x.max()) and beyond.x[-1] == pytest.approx(10 * x.max())
    assert ("(not identified)" in fitted.name) == (not fits["compute"].verdict.identified)
    for band in d.curves:
        lo, y, hi = (np.array(v) for v in (band.lo, band.y, band.hi))
        assert np.all(lo <= y + 1e-12) and np.all(y <= hi + 1e-12) and np.all(hi > lo)


def test_loss_vs_virtual_width_data(study):
    frame, fits = study
    d = F.loss_vs_virtual_width_data(frame, loss="final/val_loss",
                                     n_col="derived.n_params_active",
                                     v_col="derived.virtual_width", d_col="final/tokens",
                                     fit=fits["vw_multiplicative"])
    assert len(d.points) == 4 and all(len(s.x) == 4 for s in d.points)  # 4 sizes x 4 widths
    assert all(s.x == tuple(sorted(s.x)) for s in d.points)
    assert len(d.curves) == 4
    # the fitted curve falls with V (gamma > 0) and tracks the points at the largest budget
    for s, c in zip(d.points, d.curves):
        assert c.y[0] > c.y[-1]
        assert abs(np.interp(s.x[0], c.x, c.y) - s.y[0]) < 0.05


def test_other_figure_data(study):
    frame, fits = study
    r = F.residual_data(frame, fits=fits, compute="final/flops")
    assert [s.name for s in r.series] == ["compute", "vw_multiplicative"]
    assert np.abs(r.series[1].y).max() < 0.03  # the right law leaves small residuals
    h = F.holdout_data(fits)
    assert len(h.series) == 2 and all("RMSE" in s for s in h.summary)
    b = F.bootstrap_data(fits)
    assert [s.name for s in b.samples] == ["compute: alpha", "vw_multiplicative: alpha",
                                           "vw_multiplicative: gamma", "vw_multiplicative: beta"]
    from moue.analysis.render import draw_bootstrap

    fig = draw_bootstrap(b)  # one panel per exponent, each with its estimate marked
    assert len(fig.data) == 4 and len({t.xaxis for t in fig.data}) == 4 and len(fig.layout.shapes) == 4
    p = F.parallel_data(frame, loss="final/val_loss")
    names = [n for n, _ in p.dimensions]
    assert "window" in names and names[-1] == "val loss"  # short words, not MLflow keys
    assert "pool" not in names  # constant columns are left out
    for name, codes in p.categories.items():  # categorical axes (family, router) carry their names
        values = dict(p.dimensions)[name]
        assert set(values) <= set(range(len(codes))) and len(codes) > 1
    rows = F.param_rows(fits)
    assert any(r.parameter == "gamma" and r.lo < r.estimate < r.hi for r in rows)


def test_page_is_self_contained(report_html):
    path, _ = report_html
    text = path.read_text(encoding="utf-8")
    assert text.count("<script type=\"text/javascript\">/**") <= 1
    assert len(re.findall(r"plotly\.js v\d", text)) == 1  # the bundle's banner: embedded once
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+href=\"?https?:", text)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", text)
    for name in FIGURES:
        assert f'data-figure="{name}"' in text
    for heading in ("Fitted laws", "Does virtual width help?", "Provenance",
                    "Which settings matter (parameter importance)"):
        assert heading in text
    assert "vw_multiplicative" in text and "sha256:stdlib-3.11" in text


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium at /usr/bin/chromium (CI's .ci/run "
                    "installs it: apt-get install -y chromium)")
def test_every_figure_renders_in_headless_chromium_offline(report_html, tmp_path):
    path, _ = report_html
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           # offline: every host name fails to resolve, so any network fetch would fail
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000",
           "--dump-dom", path.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "</html>" in dom, out.stderr[-2000:]
    parts = re.split(r'data-figure="', dom)[1:]
    rendered = {}
    for part in parts:
        name = part.split('"', 1)[0]
        rendered[name] = part.count('class="main-svg"')
    assert set(rendered) == set(FIGURES)
    missing = [n for n, k in rendered.items() if k == 0]
    assert not missing, f"figures without a rendered plot SVG: {missing}"
    assert 'class="js-plotly-plot"' in dom or "js-plotly-plot" in dom


def test_png_export_is_skipped_cleanly_without_kaleido(study, tmp_path):
    import importlib.util

    from moue.analysis.render import draw_residuals
    from moue.analysis.report import _export_png

    if importlib.util.find_spec("kaleido") is not None:
        pytest.skip("kaleido is installed: the skip path is not reachable")
    frame, fits = study
    fig = draw_residuals(F.residual_data(frame, fits=fits, compute="final/flops"))
    notes = _export_png({"residuals": fig}, tmp_path / "png")
    assert notes == ["PNG export skipped: kaleido is not installed (pip install 'moue[png]')"]
    assert not (tmp_path / "png").exists()


def test_laws_without_d_are_fitted_at_the_largest_budget(study):
    """A study of several token budgets: chinchilla and compute use every run, vw_interaction
    (no D term) only the runs at the largest budget, and says so; its nested test and residuals
    use the same rows."""
    from moue.analysis.report import fit_laws, law_frame

    frame, _ = study
    budgets = sorted(set(frame.get_column("final/tokens").to_list()))
    assert len(budgets) > 1
    for law in ("compute", "chinchilla", "vw_additive"):
        rows, note = law_frame(frame, law)
        assert rows.height == frame.height and note is None
    rows, note = law_frame(frame, "vw_interaction")
    assert set(rows.get_column("final/tokens").to_list()) == {budgets[-1]}
    assert 0 < rows.height < frame.height and f"{rows.height} runs at the largest token budget" in note
    with warnings.catch_warnings(record=True) as caught:  # notes are returned, not warned
        warnings.simplefilter("always")
        fitted = fit_laws(frame, laws=["vw_interaction"], n_bootstrap=20)
    assert not [w for w in caught if "vw_interaction" in str(w.message)]
    assert fitted.notes[0] == note and "no D term" in note
    assert fitted.notes[1:] == fitted.fits["vw_interaction"].notes
    assert "fit vw_interaction: n_bootstrap=20 < 1000: intervals are rough" in fitted.notes
    fits, skipped = fitted.fits, fitted.skipped
    prov = fits["vw_interaction"].provenance
    assert not skipped and prov.n_points == rows.height
    assert "largest token budget" in prov.filter
    r = F.residual_data(frame, fits=fits, compute="final/flops", frames={"vw_interaction": rows})
    assert len(r.series[0].x) == rows.height


def test_iso_active_sizes_share_one_curve():
    """Sizes matched to a few percent (an iso-active design) are one group; the next depth is not."""
    N = np.array([82752, 83265, 82528, 165440, 162369, 165312, 248128, 246593, 247936] * 2, dtype=float)
    groups = F._size_groups(N)
    assert [len(g) for g in groups] == [3, 3, 3]
    assert [g.min() for g in groups] == [82528, 162369, 246593]
    assert [len(g) for g in F._size_groups(np.array([100.0, 104.0, 110.0]))] == [2, 1]


@pytest.mark.slow
def test_laws_of_compute_alone_are_fitted_on_final_points_of_a_ladder():
    """The ladder's runs with their cooldown branches (tests/data): a law in C alone gets the 15
    final points (one allocation line, 20 tokens per parameter) and says so, a law in (N, D) every
    point; on the final points ``compute`` (with E) is identified and extrapolates to the largest
    size within 2%, where fitted on all 45 points its E falls to the bound 0."""
    import polars as pl

    from moue.analysis.loading import with_cooldown_points
    from moue.analysis.report import FINAL_POINTS_FILTER, fit_laws, law_rows

    runs = pl.read_csv(DATA / "ladder_runs_20261201.csv", infer_schema_length=None)
    frame = with_cooldown_points(runs)
    assert frame.height == 45
    rows, note, suffix = law_rows(frame, "compute")
    assert rows.height == 15 and set(rows["point"].to_list()) == {"final"} and suffix == FINAL_POINTS_FILTER
    assert "fitted on the 15 final points, not on the 30 cooldown branches" in note
    assert law_rows(frame, "chinchilla")[0].height == 45
    assert law_rows(runs, "compute")[1] is None  # no branches, nothing left out
    fitted = fit_laws(frame, laws=["compute", "chinchilla"], n_bootstrap=200)
    assert fitted.notes[0] == note
    r = fitted.fits["compute"]
    assert r.provenance.n_points == 15 and r.provenance.filter.endswith(FINAL_POINTS_FILTER)
    assert r.verdict.identified and r.holdout.mape < 2.0 and r.params["E"] > 0.5
    assert fitted.fits["chinchilla"].provenance.n_points == 45
    every = fit(frame, law="compute", variables={"C": "final/flops"}, n_bootstrap=0)
    assert every.params["E"] < 1e-3 and every.holdout.mape > 2.5
