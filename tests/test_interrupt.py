"""Ctrl-C during `moue run` (issue 15): the sweep stops cleanly, nothing is fitted or reported,
the interrupted trials have one status everywhere (summary, MLflow tag, MLflow run status), the
parent run is not FINISHED, and the same command resumes and finishes the study."""

from __future__ import annotations

import os
import pty
import re
import select
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
    text = text.replace('kind = "asha"', 'kind = "none"').replace("tokens = 4096", "tokens = 131_072")
    spec = tmp_path / "smoke_long.toml"
    spec.write_text(text)
    return spec


def _run(spec: Path, ws: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from moue.studies.cli import main; main()", "run", str(spec),
                             "--workspace", str(ws), "--bootstrap", "50"], cwd=ROOT, env=ENV, text=True,
                            start_new_session=True, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw})


def _read(fd: int, until, timeout: float) -> str:
    """What a terminal shows: read the pty until ``until(text)`` or the process closes it."""
    text, end = b"", time.time() + timeout
    while time.time() < end:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            text += chunk
            if until(text.decode(errors="replace")):
                break
    return text.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_stops_the_sweep_cleanly_and_the_next_run_resumes(tmp_path) -> None:
    spec, ws = _spec(tmp_path), tmp_path / "ws"
    # the first run on a terminal, as a user runs it: the progress is a table redrawn in place
    master, slave = pty.openpty()
    proc = _run(spec, ws, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    trained = re.compile(r"\| [1-9]\d*% of the work")  # a trial reported a mark past its start
    seen = _read(master, lambda t: trained.search(t) is not None, 300)
    assert trained.search(seen), "no trial reported in time:\n" + seen
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
    err = seen + _read(master, lambda t: False, 300)
    proc.wait(timeout=60)
    os.close(master)
    out = err
    assert proc.returncode == 130, err
    assert "trial" in err and "family" in err and "layerwise" in err and " / " in err  # the running trials' table
    assert "\x1b[1A" in err  # redrawn in place
    assert "INFO" not in err, "no Ray or MLflow log lines on the console"
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err).replace("\r", "")  # the text a user reads
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
    n_finished = len(trials) - n_interrupted
    assert f"{n_interrupted} trial(s) stopped before they ended, {6 - len(trials)} not started" in err

    again = _run(spec, ws)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, out + err
    assert "resuming the sweep" in out and "sweep smoke: 6 trials (6 finished)" in out
    # the progress starts from what the interrupted run did, not from 0 (off a terminal: lines)
    first = next(line for line in err.splitlines() if line.startswith("[moue]"))
    assert first.startswith(f"[moue] {n_finished}/6 done"), first
    assert re.search(r"\| [1-9]\d*% of the work", first), first
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("moue.kind") == "trial"]
    assert len(trials) == 6 and all(r.data.tags["moue.status"] == "finished" for r in trials)
    assert all(r.info.status == "FINISHED" for r in trials)
    parent = next(r for r in runs if r.data.tags.get("moue.kind") == "study")
    assert parent.info.status == "FINISHED" and parent.data.metrics["study/trials_interrupted"] == 0
    assert (ws / "reports" / "smoke.html").is_file()
