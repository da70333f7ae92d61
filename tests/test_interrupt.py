"""Ctrl-C during `moue run` (issue 15): the sweep stops cleanly, nothing is fitted or reported,
the interrupted trials have one status everywhere (summary, MLflow tag, MLflow run status), the
parent run is not FINISHED, and the same command resumes and finishes the study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}


def _spec(tmp_path: Path) -> Path:
    """The smoke study without ASHA and with trials long enough to be interrupted (seconds each)."""
    text = (ROOT / "studies" / "smoke.toml").read_text()
    text = text.replace('kind = "asha"', 'kind = "none"').replace("tokens = 4096", "tokens = 262_144")
    spec = tmp_path / "smoke_long.toml"
    spec.write_text(text)
    return spec


def _run(spec: Path, ws: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from studies.cli import main; main()", "run", str(spec),
                             "--workspace", str(ws), "--bootstrap", "50"], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


@pytest.mark.timeout(900)
def test_ctrl_c_stops_the_sweep_cleanly_and_the_next_run_resumes(tmp_path) -> None:
    spec, ws = _spec(tmp_path), tmp_path / "ws"
    proc = _run(spec, ws)
    seen, end = [], time.time() + 300
    for line in proc.stderr:  # the progress lines: wait until a trial has reported a mark
        seen.append(line)
        if "best val" in line and "best val -" not in line:
            break
        assert time.time() < end, "no trial reported in time:\n" + "".join(seen)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
    out, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    assert proc.returncode == 130, out + err
    assert "interrupted: the sweep smoke was interrupted" in err and "nothing was fitted" in err
    assert "report:" not in out and not (ws / "reports" / "smoke.html").exists()  # no partial fit
    assert "Tuner.restore" not in err and "Trials did not complete" not in err  # moue says it, once

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("moue.kind") == "study")
    trials = [r for r in runs if r.data.tags.get("moue.kind") == "trial"]
    assert parent.info.status == "KILLED"
    statuses = {r.data.tags.get("moue.status") for r in trials}
    assert "interrupted" in statuses and statuses <= {"finished", "interrupted"}, statuses
    for r in trials:  # one status everywhere: the tag and the run status agree
        want = {"finished": "FINISHED", "interrupted": "KILLED"}[r.data.tags["moue.status"]]
        assert r.info.status == want, (r.info.run_name, r.info.status)
    n_interrupted = sum(r.data.tags["moue.status"] == "interrupted" for r in trials)
    assert f"{n_interrupted} trial(s) stopped before they ended, {6 - len(trials)} not started" in err

    again = _run(spec, ws)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, out + err
    assert "resuming the sweep" in out and "sweep smoke: 6 trials (6 finished)" in out
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("moue.kind") == "trial"]
    assert len(trials) == 6 and all(r.data.tags["moue.status"] == "finished" for r in trials)
    assert all(r.info.status == "FINISHED" for r in trials)
    parent = next(r for r in runs if r.data.tags.get("moue.kind") == "study")
    assert parent.info.status == "FINISHED" and parent.data.metrics["study/trials_interrupted"] == 0
    assert (ws / "reports" / "smoke.html").is_file()
