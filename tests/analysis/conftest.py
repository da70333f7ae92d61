"""Shared fixtures: reference data paths and a real MLflow SQLite store with a logged study."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def chinchilla_frame():
    """Epoch AI's 240 points (the 5 highest losses dropped, as Epoch does), with D = C / (6 N)."""
    import polars as pl

    df = pl.read_csv(DATA / "chinchilla_epoch2024.csv")
    fifth_highest = df.get_column("loss").sort(descending=True)[4]
    return df.filter(pl.col("loss") < fifth_highest).with_columns(
        D=pl.col("Training FLOP") / (6 * pl.col("Model Size")))


@pytest.fixture(scope="session")
def logged_study(tmp_path_factory):
    """A study logged as docs/TRACKING.md says: 48 finished trials plus excluded ones.

    Returns (tracking_uri, experiment, parent_run_id, workspace).
    """
    from study_log import Trial, default_trials, log_study

    ws = tmp_path_factory.mktemp("ws")
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    trials = default_trials() + [
        Trial(d_model=64, n_layers=4, window=4, pool_size=16, tokens=20_000_000,
              status="diverged"),
        Trial(d_model=64, n_layers=4, window=8, pool_size=16, tokens=20_000_000,
              status="diverged"),
        Trial(d_model=96, n_layers=4, window=4, pool_size=16, tokens=20_000_000, status="failed"),
        Trial(d_model=96, n_layers=4, window=8, pool_size=16, tokens=60_000_000,
              status="early_stopped"),
        Trial(d_model=128, n_layers=6, window=2, pool_size=16, tokens=60_000_000,
              status="running"),
    ]
    pid = log_study(uri, "vw_study", trials, artifact_root=str(ws / "artifacts"))
    return uri, "vw_study", pid, ws


@pytest.fixture(scope="session")
def cli():
    """A test-local typer app with the analysis commands registered, and a runner."""
    import typer
    from typer.testing import CliRunner

    from moue.analysis.cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def report_html(logged_study, cli):
    """``moue report`` on the logged study (200 resamples to stay quick); returns (path, result)."""
    uri, exp, _, ws = logged_study
    out = ws / "reports" / "vw_study.html"
    laws = ["--law", "compute", "--law", "chinchilla", "--law", "vw_multiplicative", "--law",
            "vw_interaction"]
    result = cli("report", exp, "--tracking-uri", uri, "-o", out, "--bootstrap", "200", *laws)
    assert result.exit_code == 0, result.output
    return out, result
