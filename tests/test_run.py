"""`moue run`: sweep + fits + report + summary on the embedded default, resumable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # local runs: token auth


def _run(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:  # a hang guard: a run took 177 s on three workers
    return subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", "run", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_moue_run_smoke_end_to_end_and_rerun_resumes(tmp_path) -> None:
    ws = tmp_path / "ws"
    first = _run("studies/smoke.toml", "--workspace", str(ws), "--bootstrap", "200")
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "INFO mlflow" not in out + first.stderr, "no MLflow log lines on the console"
    assert "--resume" not in out, "no resume hint when every trial has ended"
    assert "sweep smoke: 6 trials" in out
    assert "runs: " in out and " used" in out, "the summary says which runs the fits used and left out"
    report = ws / "reports" / "smoke.html"
    assert report.is_file() and f"report: {report}" in out
    assert "moue ui --workspace" in out
    # the smoke study's compute law has too few finished trials or is fitted: either way it says so
    assert "compute" in out
    html = report.read_text()
    assert html.count("<script") >= 1 and "plotly" in html.lower()

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    assert sum(r.data.tags.get("moue.kind") == "study" for r in runs) == 1
    n_children = sum(r.data.tags.get("moue.kind") == "trial" for r in runs)
    assert n_children == 6
    # the study's summary on its parent run: counts by status, the best trial, each law's verdict
    parent = next(r for r in runs if r.data.tags.get("moue.kind") == "study")
    trials = [r for r in runs if r.data.tags.get("moue.kind") == "trial"]
    m, tags = parent.data.metrics, parent.data.tags
    assert sum(m[f"study/trials_{s}"] for s in ("finished", "early_stopped", "diverged", "failed")) == 6
    assert m["study/trials_finished"] == sum(r.data.tags["moue.status"] == "finished" for r in trials)
    best = min((r for r in trials if r.data.tags["moue.status"] == "finished"),
               key=lambda r: r.data.metrics["final/val_loss"])
    assert tags["moue.best_trial_run_id"] == best.info.run_id
    assert m["study/best_val_loss"] == best.data.metrics["final/val_loss"]
    assert f"best trial: {best.info.run_name} (final val loss" in out
    verdict = tags["moue.fit.compute"]
    assert verdict == "identified" or verdict.startswith(("not identified: ", "not fitted: "))
    assert ("fit/compute/alpha" in m) == (verdict == "identified")  # no estimate of an unidentified law

    again = _run("studies/smoke.toml", "--workspace", str(ws), "--bootstrap", "200")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming the sweep" in again.stdout
    runs = client.search_runs([exp.experiment_id])
    assert sum(r.data.tags.get("moue.kind") == "study" for r in runs) == 1, "the parent is reused"
    assert sum(r.data.tags.get("moue.kind") == "trial" for r in runs) == 6, "no trial runs again"

    # a second sweep of the same study in the same workspace: its own name, experiment and report
    before = report.stat().st_mtime_ns
    second = _run("studies/smoke.toml", "--workspace", str(ws), "--bootstrap", "200", "--new")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "a new sweep of smoke: smoke-2" in second.stdout and "resuming" not in second.stdout
    assert "sweep smoke-2: 6 trials" in second.stdout
    assert (ws / "reports" / "smoke-2.html").is_file()
    assert report.stat().st_mtime_ns == before  # the first sweep's report is left as it was
    exp2 = client.get_experiment_by_name("smoke-2")
    assert sum(r.data.tags.get("moue.kind") == "trial" for r in client.search_runs([exp2.experiment_id])) == 6
    assert len(client.search_runs([exp.experiment_id])) == 7, "the first sweep's experiment is untouched"


def test_moue_run_bad_spec_exits_2(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "studies" / "smoke.toml").read_text().replace('space = "virtual_width"', 'space = "x"'))
    proc = _run(str(bad), "--workspace", str(tmp_path / "ws"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: search.space ('x') must be one of")
    assert not (tmp_path / "ws").exists()
