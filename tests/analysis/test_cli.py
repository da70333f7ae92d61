"""The analysis commands through typer's CliRunner on a test-local app."""

from __future__ import annotations

import json

import pytest

from conftest import DATA

CSV = DATA / "chinchilla_epoch2024.csv"


def test_import_is_light():
    import subprocess
    import sys

    # moue_core's pure-Python modules (the tracking contract, the error type) are light: its
    # package loads torch-backed attributes lazily, and torch is in the list
    code = ("import sys, moue.analysis.cli; heavy = [m for m in ('polars', 'scipy', 'plotly', "
            "'mlflow', 'torch', 'ray', 'moue.model', 'moue.train') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fit_json(cli):
    r = cli("fit", CSV, "--law", "compute", "--loss", "loss", "--set", 'C="Training FLOP" * 1',
            "--where", "loss < 4.5", "--bootstrap", "200", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(d["params"]) == {"E", "A", "alpha"}
    assert set(d["ci"]) == {"E", "A", "alpha"} and d["n_bootstrap"] == 200
    assert d["diagnostics"]["n_starts"] == 210 and "bootstrap" not in d
    assert d["holdout"]["n_test"] >= 1 and d["holdout"]["rmse"] > 0
    assert d["variables"]["C"] == 'C = "Training FLOP" * 1'
    assert d["provenance"]["filter"] == "loss < 4.5"
    # the fit's notes, printed once each on stderr
    assert r.stderr.count("warning: fit compute: n_bootstrap=200 < 1000: intervals are rough") == 1


def test_fit_table_output(cli):
    r = cli("fit", CSV, "--law", "compute", "--loss", "loss", "--set", "C=Training FLOP",
            "--bootstrap", "0", "--no-holdout")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # rich wraps at the terminal width
    assert "alpha" in text and "starts reached the best basin" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--law", "nope", "--loss", "loss", "--set", "C=x"], "law ('nope') is not one of"),
        (["--law", "compute", "--loss", "los", "--set", "C=Training FLOP"],
         "loss ('los') is not a column"),
        (["--law", "compute", "--loss", "loss", "--set", "N=Model Size"],
         "--set ('N') is not a variable of law compute"),
        (["--law", "chinchilla", "--loss", "loss", "--set", "N=Model Size"],
         "--set ('D') must be given for law chinchilla"),
        (["--law", "compute", "--loss", "loss", "--set", "C=Training FLOP", "--where",
          '"Model Size" < 7e7'], "points (1) are too few"),
        (["--law", "chinchilla", "--loss", "loss", "--set", "N=Model Size", "--set",
          "D=6.0 + 0 * x"], "variables.D"),
        (["--law", "compute", "--loss", "loss", "--set", "C=Training FLOP", "--holdout-min",
          "lots"], "--holdout-min ('lots') must be a number"),
    ],
)
def test_fit_bad_input_exits_2_with_one_line(cli, args, message):
    r = cli("fit", CSV, *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_fit_refuses_single_valued_axis_and_nan(cli, tmp_path):
    import polars as pl

    df = pl.read_csv(CSV).with_columns(D=pl.lit(1e10))
    df.write_csv(tmp_path / "one.csv")
    r = cli("fit", tmp_path / "one.csv", "--law", "chinchilla", "--loss", "loss", "--set",
            "N=Model Size", "--set", "D=D")
    assert r.exit_code == 2 and "variables.D ('D') has a single value" in r.stderr
    df = pl.read_csv(CSV).with_columns(
        loss=pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("loss")))
    df.write_parquet(tmp_path / "nan.parquet")
    r = cli("fit", tmp_path / "nan.parquet", "--law", "compute", "--loss", "loss", "--set",
            "C=Training FLOP")
    assert r.exit_code == 2 and "loss ('loss') has 1 missing" in r.stderr


def test_report_command(report_html, logged_study):
    path, result = report_html
    assert path.exists() and path.stat().st_size > 1_000_000
    assert "4 laws fitted" in result.stdout and "logged as an artifact" in result.stdout
    from mlflow import MlflowClient

    uri, _, pid, _ = logged_study
    arts = [a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(pid, "reports")]
    # the page and its summary JSON (other tests' reports of this session-wide study may sit beside them)
    assert {"reports/vw_study.html", "reports/vw_study.json"} <= set(arts)


def test_report_bad_input(cli, logged_study):
    uri, exp, _, _ = logged_study
    r = cli("report", "nope", "--tracking-uri", uri)
    assert r.exit_code == 2 and r.stderr.startswith("error: experiment ('nope') is not in")
    r = cli("report", exp, "--tracking-uri", uri, "--law", "bogus")
    assert r.exit_code == 2 and "law ('bogus')" in r.stderr


def test_check_gate_end_to_end(cli, logged_study, tmp_path):
    from study_log import TRUE, default_trials, log_study, true_loss

    uri, exp, _, ws = logged_study
    baseline = tmp_path / "baseline.json"
    r = cli("check", exp, "--baseline", baseline, "--tracking-uri", uri, "--write-baseline",
            "--law", "vw_multiplicative", "--bootstrap", "300")
    assert r.exit_code == 0, r.output
    assert baseline.exists() and "wrote baseline" in r.stdout
    r = cli("check", exp, "--baseline", baseline, "--tracking-uri", uri)
    assert r.exit_code == 0, r.output
    assert "paired" in r.stdout and "pass" in " ".join(r.stdout.split())

    # a study whose data scale with a steeper N exponent: different runs -> Wald test -> fail
    steeper = {**TRUE, "alpha": 0.40, "A": 200.0}
    log_study(uri, "vw_shifted", default_trials(), artifact_root=str(ws / "artifacts"),
              loss_fn=lambda N, D, V: true_loss(N, D, V, steeper), rng_seed=7)
    r = cli("check", "vw_shifted", "--baseline", baseline, "--tracking-uri", uri)  # another experiment's baseline
    assert r.exit_code == 2 and f"is the baseline of experiment {exp!r}, not 'vw_shifted'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("check", "vw_shifted", "--baseline", baseline, "--tracking-uri", uri, "--force-experiment")
    assert r.exit_code == 1, r.output
    text = " ".join(r.stdout.split())
    assert "wald" in text and "FAIL" in text and "regression in vw_multiplicative" in text

    # degenerate inputs: too few points, one-valued axis -> exit 2 with the reason
    log_study(uri, "tiny", default_trials()[:4], artifact_root=str(ws / "artifacts"))
    r = cli("check", "tiny", "--baseline", baseline, "--tracking-uri", uri, "--force-experiment")
    assert r.exit_code == 2 and "points (4) are too few" in r.stderr
    one_d = [t for t in default_trials() if t.tokens == 120_000_000]
    log_study(uri, "one_d", one_d, artifact_root=str(ws / "artifacts"))
    r = cli("check", "one_d", "--baseline", baseline, "--tracking-uri", uri, "--force-experiment")
    assert r.exit_code == 2 and "variables.D ('final/tokens') has a single value" in r.stderr
    nan = default_trials()
    log_study(uri, "nan_loss", nan, artifact_root=str(ws / "artifacts"),
              loss_fn=lambda N, D, V: float("nan") if N == nan[0].n_active and D == 2e7
              and V == 8 else true_loss(N, D, V))
    r = cli("check", "nan_loss", "--baseline", baseline, "--tracking-uri", uri, "--force-experiment")
    assert r.exit_code == 2 and "loss ('final/val_loss') has 1 missing" in r.stderr
    r = cli("check", exp, "--baseline", tmp_path / "missing.json", "--tracking-uri", uri)
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_bench_fit_json(cli):
    r = cli("bench-fit", "--json", "--reference-starts", "45")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"speedup", "fit_s", "reference_s", "max_param_diff", "bootstrap_1000_s", "cpu", "blas",
            "wide_vectors"} <= set(d)
    assert d["cpu"] and d["blas"]
    from moue.analysis._numba_target import WIDE  # the kernels the bench ran are loaded

    assert d["wide_vectors"] is WIDE
    assert d["reference_scaled"] and d["reference_starts"] == 45 and d["n_starts"] == 4500
    assert d["max_param_diff"] < 1e-4
    assert d["params_ours"]["alpha"] == pytest.approx(0.3473, abs=1e-3)


def test_check_a_law_without_d_on_the_rows_of_its_baseline(cli, logged_study, tmp_path):
    """vw_interaction on a multi-budget study: the baseline is fitted on the largest-budget runs,
    and the check refits on the same runs, so the paired test applies (same clusters) and passes."""
    uri, exp, _, _ = logged_study
    baseline = tmp_path / "interaction.json"
    r = cli("check", exp, "--baseline", baseline, "--tracking-uri", uri, "--write-baseline",
            "--law", "vw_interaction", "--bootstrap", "100")
    assert r.exit_code == 0, r.output
    assert "no D term" in r.stderr
    import json

    fitted = json.loads(baseline.read_text())["fits"]["vw_interaction"]
    # this small study does not identify b and c: the gate refuses them, saying why
    r = cli("check", exp, "--baseline", baseline, "--tracking-uri", uri)
    assert r.exit_code == 2 and "is not identified" in r.output and "wider than its estimate" in r.output
    r = cli("check", exp, "--baseline", baseline, "--tracking-uri", uri, "--force-unidentified")
    assert r.exit_code == 0, r.output
    assert "paired" in r.stdout and "pass" in " ".join(r.stdout.split()), r.stdout
    assert "largest token budget" in fitted["provenance"]["filter"]


@pytest.mark.parametrize("text", ["", "\n\n", "loss,x\n"])
def test_fit_on_an_empty_or_blank_table_is_one_line_and_exit_2(cli, tmp_path, text):
    path = tmp_path / "t.csv"
    path.write_text(text)
    r = cli("fit", path, "--law", "compute", "--loss", "loss", "--set", "C=x")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "FILE" in r.output, r.output


def test_a_nan_loss_is_refused_with_a_where_that_works_on_nan(cli, tmp_path):
    """A NaN loss: exit 2 naming the column and a --where that filters it; that --where works
    although polars orders NaN above every number ("loss" > 0 would keep it without the fix)."""
    import numpy as np

    c = np.logspace(15, 19, 12)
    loss = list(1.7 + 400 * c**-0.1)
    loss[3] = float("nan")
    path = tmp_path / "t.csv"
    path.write_text("loss,C\n" + "".join(f"{v},{x}\n" for v, x in zip(loss, c)))
    r = cli("fit", path, "--law", "compute_power", "--loss", "loss", "--set", "C=C")
    assert r.exit_code == 2 and "--where '\"loss\" > 0'" in r.output, r.output
    r = cli("fit", path, "--law", "compute_power", "--loss", "loss", "--set", "C=C", "--where", '"loss" > 0',
            "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["provenance"]["n_points"] == 11


def test_export_writes_one_typed_row_per_finished_trial(cli, logged_study, tmp_path):
    import polars as pl

    from moue.analysis.loading import load_runs

    uri, exp, _, _ = logged_study
    want = load_runs(exp, tracking_uri=uri).frame
    r = cli("export", exp, "--tracking-uri", uri, "-o", tmp_path / "runs.parquet")
    assert r.exit_code == 0, r.output
    got = pl.read_parquet(tmp_path / "runs.parquet")
    assert got.height == want.height == 48 and got.schema == want.schema and "left out:" in r.stdout
    assert "2 diverged" in r.stdout
    r = cli("export", exp, "--tracking-uri", uri, "-o", tmp_path / "runs.csv", "--include", "diverged")
    assert r.exit_code == 0, r.output
    csv = pl.read_csv(tmp_path / "runs.csv")
    assert set(csv["run_id"]) == set(want["run_id"]) and "2 diverged" not in r.stdout  # (they have no final loss)
    r = cli("export", exp, "--tracking-uri", uri, "-o", tmp_path / "runs.xlsx")
    assert r.exit_code == 2 and "must end in .parquet or .csv" in r.stderr
