"""`moue bench scale` (issue 14): the driver's cost per result against a real SQLite store and a
loopback mlflow server, loading and fitting logged experiments, and planning a grid, as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moue.studies import bench_scale

FIELDS = ("driver_ms_per_result_sqlite", "driver_ms_per_result_server", "load_s_1k", "load_s_10k", "fit_s_10k",
          "plan_s_10k")


def _moue(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_bench_scale_json_has_the_issue_fields_and_a_fit_of_the_logged_runs(tmp_path) -> None:
    out = _moue(["bench", "scale", "--counts", "30,90", "--driver-trials", "6", "--bootstrap", "10", "--json"],
                tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # stdout is the JSON alone (no MLflow "View run" lines)
    for key in FIELDS:
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert result["trials"] == {"small": 30, "large": 90} and result["driver_results"] == 6 * 4
    assert result["log_s_1k"] > 0 and set(result["growth"]) == {"plan", "log", "load", "fit"}
    # the synthetic losses follow a Chinchilla law: the fit of 90 runs finds its exponents near
    assert abs(result["fit_10k"]["alpha"] - bench_scale.LAW["alpha"]) < 0.15, result["fit_10k"]


def test_logged_experiments_are_cached_and_reused(tmp_path) -> None:
    """Logging 10,000 runs takes minutes: a second run reuses the store an earlier one left."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    uri, took = bench_scale._logged_store(12, tmp_path / "a", tmp_path / "cache")
    again, took2 = bench_scale._logged_store(12, tmp_path / "b", tmp_path / "cache")
    assert took > 0 and took2 is None and again == uri
    assert not list((tmp_path / "cache").glob(".*part"))  # written under a temporary name, then renamed
    import moue

    assert moue.load_runs("scale_12", tracking_uri=uri).frame.height == 12


def test_the_driver_measurement_checks_the_store_got_the_records(tmp_path, monkeypatch) -> None:
    """A driver that wrote nothing would look fast: the benchmark refuses it."""
    import pytest

    from moue.studies.callbacks import MlflowCallback

    study = bench_scale._study(4, tmp_path)
    monkeypatch.setattr(MlflowCallback, "on_trial_result", lambda self, *a, **k: None)
    with pytest.raises(RuntimeError, match="val/loss points"):
        bench_scale._driver_ms(study, f"sqlite:///{tmp_path / 'd.db'}", 4)


def test_bench_scale_bad_counts_exit_2_with_one_line(tmp_path) -> None:
    out = _moue(["bench", "scale", "--counts", "1000"], tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "--counts ('1000')" in out.stderr and "small,large" in out.stderr
