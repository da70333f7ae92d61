"""IsoFLOP profiles (Approach 2): published data, a synthetic law with known exponents, the bias
flags, the verdict and the command line."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from moue.analysis.errors import AnalysisError
from moue.analysis.isoflop import group_budgets, isoflop
from conftest import DATA

CSV = DATA / "chinchilla_epoch2024.csv"


def _epoch() -> pl.DataFrame:
    """Epoch's filter: the 240 rows whose loss is below the 5th-highest."""
    d = pl.read_csv(CSV)
    return d.filter(pl.col("loss") < d["loss"].sort(descending=True)[4])


def _chinchilla_grid(budgets, n_per=9, span=1.2, noise=0.0, seed=0, centre=1.0):
    """Exact IsoFLOP suites of L = E + A/N^alpha + B/D^beta, D = C/6N, N log-spaced around N_opt."""
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt = G * (C / 6) ** (beta / (alpha + beta))
        for n in n_opt * centre * np.logspace(-span / 2, span / 2, n_per):
            d = C / (6 * n)
            rows.append((E + A / n**alpha + B / d**beta + noise * rng.standard_normal(), n, C))
    loss, n, c = (np.array(v) for v in zip(*rows))
    return loss, n, c, beta / (alpha + beta)


def test_epoch_chinchilla_gives_an_exponent_within_hoffmanns_approach_2_interval():
    d = _epoch()
    r = isoflop(d["loss"].to_numpy(), d["Model Size"].to_numpy(), d["Training FLOP"].to_numpy())
    assert 0.462 <= r.a <= 0.534  # Hoffmann et al. 2022, Table 2, Approach 2
    assert r.a_ci[0] < r.a < r.a_ci[1] and r.b_ci[0] < r.b < r.b_ci[1]
    assert r.a + r.b == pytest.approx(1.0)  # D = C / 6N: the exponents add to 1
    assert sum(b.used for b in r.budgets) >= 10 and r.identified


def test_a_synthetic_law_recovers_its_exponents_and_a_given_d_column_agrees():
    loss, n, c, a_true = _chinchilla_grid(np.logspace(18, 22, 7), noise=0.002)
    r = isoflop(loss, n, c, bootstrap=200)
    assert r.a == pytest.approx(a_true, abs=0.02) and r.a_ci[0] < a_true < r.a_ci[1]
    assert r.identified and not r.notes
    r_d = isoflop(loss, n, c, c / (6 * n), bootstrap=0)
    assert r_d.b == pytest.approx(1 - a_true, abs=0.03)


def test_bias_flags_and_the_verdict():
    budgets = np.logspace(18, 22, 5)
    loss, n, c, _ = _chinchilla_grid(budgets, centre=30.0, span=1.0)  # every N far above the optimum
    r = isoflop(loss, n, c, bootstrap=50)
    assert all("minimum-outside-range" in b.flags or "no-minimum" in b.flags for b in r.budgets)
    assert not r.identified and any("outside the sampled N" in x or "minimum" in x for x in r.reasons)
    loss, n, c, _ = _chinchilla_grid(np.logspace(18, 18.5, 3), span=1.0)
    r = isoflop(loss, n, c, bootstrap=50)
    assert not r.identified and any("decades of compute" in x for x in r.reasons)
    loss, n, c, _ = _chinchilla_grid(budgets, span=2.0)
    assert all("wide" in b.flags for b in isoflop(loss, n, c, bootstrap=0, wide_dex=1.5).budgets)
    loss, n, c, _ = _chinchilla_grid(budgets, span=1.0, centre=2.8)  # one N below the optimum
    flagged = isoflop(loss, n, c, bootstrap=0).budgets
    assert any("off-centre" in b.flags or "minimum-outside-range" in b.flags for b in flagged)


def test_budgets_group_by_tolerance_and_bad_input_names_the_field():
    log_c = np.log10([1e18, 1.1e18, 1.2e18, 1e19, 1.05e19])
    assert [sorted(g.tolist()) for g in group_budgets(log_c, 0.1)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(AnalysisError, match="^C "):
        isoflop([1.0, 2.0], [1.0, 2.0], [1.0, 2.0])
    with pytest.raises(AnalysisError, match="^N "):
        isoflop([1.0, 2.0], [1.0, -2.0], [1.0, 2.0])


def test_isoflop_cli_json(cli, tmp_path):
    r = cli("isoflop", CSV, "--loss", "loss", "--set", "N=Model Size", "--set", "C=Training FLOP",
            "--where", "loss < 4.5", "--bootstrap", "100", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"a", "a_ci", "b", "b_ci", "budgets", "identified", "reasons"} <= set(d)
    assert len(d["a_ci"]) == 2 and d["a_ci"][0] < d["a"] < d["a_ci"][1]
    assert all({"compute", "n_points", "n_opt", "d_opt", "flags", "used"} <= set(b) for b in d["budgets"])
    blank = tmp_path / "blank.csv"
    blank.write_text("loss,N,C\n")
    r = cli("isoflop", blank, "--loss", "loss", "--set", "N=N", "--set", "C=C")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    r = cli("isoflop", CSV, "--loss", "loss", "--set", "N=Model Size")
    assert r.exit_code == 2 and "C" in r.output


def test_isoflop_figure_data_draws_each_budget_and_its_minimum():
    from moue.analysis.figures import isoflop_data

    loss, n, c, _ = _chinchilla_grid(np.logspace(18, 21, 4))
    r = isoflop(loss, n, c, bootstrap=20)
    d = isoflop_data(r)
    assert len(d.points) == 5 and d.points[-1].name.startswith("minima")
    assert len(d.curves) == 4
    for b, curve in zip(r.budgets, d.curves):
        i = int(np.argmin(curve.y))  # the drawn parabola bottoms out near the budget's minimum
        assert curve.x[i] == pytest.approx(b.n_opt, rel=0.2) and min(curve.y) == pytest.approx(b.loss_opt, abs=1e-3)


def test_a_studys_approach_2_uses_its_cooldown_branches():
    """An IsoFLOP design from WSD branches (the ladder's ``isoflop_budgets``): each size has one run
    ending at its largest budget and a cooldown branch at each smaller one. The report's Approach 2
    groups the branches with the finals by budget and recovers the law's exponent; on the final
    points alone no budget has 3 sizes."""
    from types import SimpleNamespace

    from moue.analysis.report import approach_rows

    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    budgets, rows = np.logspace(18, 21, 4), []
    for i, n in enumerate(np.logspace(7.5, 10.5, 25)):
        ds = [c / (6 * n) for c in budgets if 2 <= c / (6 * n) / n <= 300]
        if not ds:
            continue
        row = {"run_id": f"r{i}", "derived.n_params_active": n, "derived.flops_per_token": 6 * n,
               "final/tokens": ds[-1], "final/flops": 6 * n * ds[-1],
               "final/val_loss": E + A / n**alpha + B / ds[-1]**beta}
        for d in ds[:-1]:
            row |= {f"final/cooldown/{int(d)}/val_loss": E + A / n**alpha + B / d**beta,
                    f"final/cooldown/{int(d)}/tokens": d, f"final/cooldown/{int(d)}/flops": 6 * n * d}
        rows.append(row)
    frame = pl.DataFrame(rows)
    rows_out, iso = approach_rows(SimpleNamespace(frame=frame, curves=None), {})
    row = next(r for r in rows_out if r.approach.startswith("2"))
    assert iso is not None and sum(b.used for b in iso.budgets) == 4
    assert row.a == pytest.approx(beta / (alpha + beta), abs=0.03), row
    finals = frame.select([c for c in frame.columns if not c.startswith("final/cooldown/")])
    rows_out, iso = approach_rows(SimpleNamespace(frame=finals, curves=None), {})
    assert iso is None and not next(r for r in rows_out if r.approach.startswith("2")).identified
