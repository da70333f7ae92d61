"""Resume and concurrency on real components: the MLflow record decides what is done, a resumed
sweep continues the spec it started with, and one driver holds a workspace at a time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from procs import kill_marked, launched, marked_env, marked_pids, running

from moue.errors import ConfigError
from moue.studies.locking import LOCK_FILE, hold
from moue.studies.tracking import Tracker, recorded_sweep, server_env

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "studies" / "smoke.toml"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from moue.studies.cli import main; main()", *args]


def _tracker(uri: str) -> Tracker:
    tracker = Tracker(tracking_uri=uri, experiment="smoke")
    tracker.start_parent(sweep_id="smoke", study="smoke", spec_text=SMOKE.read_text(),
                         spec_sha256="a" * 64, tags={}, environment={})
    return tracker


def test_a_trial_done_in_the_record_gets_no_second_final_point(tmp_path) -> None:
    """A restarted driver re-attaches to a finished run and sees the trial complete again (Tune
    re-ran it): nothing is written twice for a (run, key, step), and its record is kept."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _tracker(uri)
    first.trial_run("t1", params={"a": 1}, tags={"moue.seed": "0"})
    first.log_metrics("t1", {"val/loss": 2.0}, step=100)
    first.finish_trial("t1", status="finished", final={"final/val_loss": 2.0, "final/tokens": 100.0})

    second = _tracker(uri)  # the restarted driver
    run_id = second.trial_run("t1", params={"a": 1}, tags={"moue.seed": "0"})
    second.log_metrics("t1", {"val/loss": 1.5, "train/loss": 1.4}, step=200)
    second.finish_trial("t1", status="early_stopped", final={"final/val_loss": 1.5, "final/tokens": 200.0})
    second.flush()
    client = mlflow.MlflowClient(uri)
    for key in ("val/loss", "final/val_loss", "final/tokens", "train/loss"):
        history = client.get_metric_history(run_id, key)
        assert len(history) == (0 if key == "train/loss" else 1), (key, history)
    run = client.get_run(run_id)
    assert run.data.tags["moue.status"] == "finished" and run.data.metrics["final/val_loss"] == 2.0
    recorded = recorded_sweep(uri, "smoke", "smoke")
    assert recorded.done["t1"]["status"] == "finished"
    assert recorded.done["t1"]["metrics"]["final/tokens"] == 100.0
    assert recorded.spec_text == SMOKE.read_text()


def test_final_points_written_without_their_status_tag_are_not_written_again(tmp_path) -> None:
    """A driver killed inside finish_trial's write, after the final points and before the status
    tag (seen once in test_driver_killed_with_sigkill_resumes): the restarted driver finishes the
    trial with one point per final key."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _tracker(uri)
    run_id = first.trial_run("t1", params={"a": 1}, tags={"moue.seed": "0"})
    first.log_metrics("t1", {"val/loss": 2.0}, step=100)
    first.flush()
    client = mlflow.MlflowClient(uri)
    client.log_metric(run_id, "final/val_loss", 2.0, step=100)  # the half-written finish: no status tag

    second = _tracker(uri)  # the restarted driver; Tune completes the trial again
    assert second.trial_run("t1", params={"a": 1}, tags={"moue.seed": "0"}) == run_id
    second.log_metrics("t1", {"val/loss": 2.0}, step=100)
    second.finish_trial("t1", status="finished", final={"final/val_loss": 2.0, "final/tokens": 100.0})
    for key in ("val/loss", "final/val_loss", "final/tokens"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [100], key
    assert client.get_run(run_id).data.tags["moue.status"] == "finished"


@pytest.mark.slow
def test_resume_with_an_edited_spec_exits_2_naming_the_change(tmp_path) -> None:
    ws = tmp_path / "ws"
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    ws.mkdir()
    spec = tmp_path / "smoke.toml"
    spec.write_text(SMOKE.read_text())
    import hashlib

    tracker = Tracker(tracking_uri=uri, experiment="smoke")
    tracker.start_parent(sweep_id="smoke", study="smoke", spec_text=spec.read_text(),
                         spec_sha256=hashlib.sha256(spec.read_bytes()).hexdigest(), tags={}, environment={})
    state = ws / "ray" / "smoke"
    state.mkdir(parents=True)
    (state / "experiment_state-2026-12-01_00-00-00.json").write_text("{}")
    (state / "tuner.pkl").write_bytes(b"\x80\x04N.")  # what Tuner.can_restore looks for
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)

    def resume():
        return subprocess.run(_cli("sweep", str(spec), "--workspace", str(ws), "--resume"), env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    spec.write_text(SMOKE.read_text().replace("lr = 3e-3", "lr = 1e-3"))
    proc = resume()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "fixed.train.lr: 0.003 -> 0.001" in line[0] and "changed since sweep" in line[0], line
    assert not launched(mark), "nothing was launched"
    # comments and layout are not a change of the study: the check lets it through (and the
    # fake state then fails in Tune, which is not what this test is about)
    spec.write_text("# a comment\n" + SMOKE.read_text())
    proc = resume()
    kill_marked(mark)
    assert "changed since sweep" not in proc.stderr


def test_second_driver_on_a_workspace_exits_2_and_a_dead_drivers_lock_is_taken(tmp_path) -> None:
    """Two `moue sweep` on one fresh workspace: the second exits 2 naming the first (no MLflow
    schema race, no doubled grid); once the first is SIGKILLed its lock is free."""
    ws = tmp_path / "ws"
    spec = tmp_path / "smoke.toml"
    spec.write_text(SMOKE.read_text().replace("tokens = 4096", "tokens = 400_000"))
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    first = subprocess.Popen(_cli("sweep", str(spec), "--workspace", str(ws)), env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lock = ws / LOCK_FILE
        end = time.time() + 120
        while not (lock.is_file() and lock.read_text()):
            assert first.poll() is None, first.stdout.read()
            assert time.time() < end, "the first driver never took the lock"
            time.sleep(0.1)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = subprocess.run(_cli("sweep", str(spec), "--workspace", str(ws)), env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use by another moue driver" in lines[0]
        assert first.poll() is None, "the first driver goes on"
        with pytest.raises(ConfigError, match="in use"):
            with hold(ws, what="workspace"):
                pass
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        kill_marked(mark)
    with hold(ws, what="workspace"):  # the dead driver's lock is taken over
        assert json.loads((ws / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_resume_on_an_empty_workspace_leaves_nothing_behind(tmp_path) -> None:
    ws = tmp_path / "never"
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(_cli("sweep", str(SMOKE), "--workspace", str(ws), "--resume"), env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no sweep state" in proc.stderr, proc.stderr
    assert not ws.exists()


def _start_server(root: Path, port: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=server_env())
    end = time.time() + 120
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the mlflow server did not start")


@pytest.mark.slow
def test_tracking_server_outage_loses_nothing(tmp_path) -> None:
    """The server dies mid-sweep and comes back: the driver tells the user once, keeps every
    record, writes it when the server is back; every trial is complete, nothing is doubled."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    spec = tmp_path / "smoke.toml"
    spec.write_text(SMOKE.read_text().replace("tokens = 4096\nmarks = 4", "tokens = 8192\nmarks = 4")
                    .replace('kind = "asha"', 'kind = "none"').replace("seeds = [0, 1]", "seeds = [0]"))
    servers = [_start_server(tmp_path, port)]
    try:
        _outage(tmp_path, spec, uri, port, servers)
    finally:
        for server in servers:  # whichever are still up, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)


def _outage(tmp_path: Path, spec: Path, uri: str, port: int, servers: list) -> None:
    server = servers[0]
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    sweep = subprocess.Popen(_cli("sweep", str(spec), "--workspace", str(tmp_path / "ws"), "--tracking-uri", uri),
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        def logged() -> bool:
            try:
                client = mlflow.MlflowClient(uri)
                exp = client.get_experiment_by_name("smoke")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                return any("val/loss" in r.data.metrics for r in runs if r.data.tags.get("moue.kind") == "trial")
            except Exception:
                return False

        end = time.time() + 240
        while not logged():
            assert sweep.poll() is None and time.time() < end, "the sweep ended before the outage:\n" + (
                sweep.stderr.read()[-3000:] if sweep.poll() is not None else "")
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)  # the outage
        server.wait(30)
        time.sleep(8)
        assert sweep.poll() is None, "the driver survives the outage"
        server = _start_server(tmp_path, port)
        servers.append(server)
        out, err = sweep.communicate(timeout=400)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        kill_marked(mark)
    assert sweep.returncode == 0, out + err
    assert err.count("does not answer") == 1 and "is back" in err, err
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("moue.kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("moue.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and all(c.data.tags.get("moue.status") == "finished" for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        for key in ("val/loss", "final/val_loss", "train/loss"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert steps and len(steps) == len(set(steps)), (key, steps)
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 5, "every mark is kept"


def _names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80])
        except OSError:
            pass
    return names


def _described(pids: list[int]) -> list[str]:
    """Name, parent and command marker of each process (what a failure needs to be understood)."""
    out = []
    for pid, name in zip(pids, _names(pids)):
        try:
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = [e.decode() for e in env if e.startswith(b"MOUE_COMMAND_ID=")]
        except (OSError, IndexError):
            ppid, command = "?", []
        out.append(f"{pid} {name.strip()} (parent {ppid}, {command or 'no command marker'})")
    return out


def _gone(mark: str, timeout: float) -> list[int]:
    end = time.time() + timeout
    while (left := marked_pids(mark)) and time.time() < end:
        time.sleep(0.5)
    return left


_COMMAND = r"""
import os, signal, subprocess, sys, time
from moue.studies import reaper
reaper.start(grace_s=1.0)
marked = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
bare = subprocess.Popen(["sleep", "300"], env={})  # a child given another environment: no marker
grandchild = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], env={}, stdout=subprocess.PIPE, text=True)
print(marked.pid, bare.pid, grandchild.stdout.readline().strip(), flush=True)  # re-parented once we die
time.sleep(300)
"""


def test_watchdog_ends_marked_processes_their_descendants_and_what_ignores_sigterm() -> None:
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    command = subprocess.Popen([sys.executable, "-c", _COMMAND], env=env, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        pids = [int(p) for p in command.stdout.readline().split()]
        assert len(pids) == 3 and all(Path(f"/proc/{p}").exists() for p in pids)
        time.sleep(2.5)  # the watchdog looks at the command's descendants once a second
        os.kill(command.pid, signal.SIGKILL)  # the command dies without cleaning up
        command.wait(10)
        end = time.time() + 20
        while (alive := [p for p in pids if running(p)]) and time.time() < end:
            time.sleep(0.2)
        assert not alive, f"left running: {alive} of {pids}"
    finally:
        kill_marked(mark)


_ORPHANING = r"""
import os, signal, subprocess, sys
from moue.studies import reaper
reaper.start(grace_s=1.0)
# a child with no marker whose parent exits at once: re-parented to init before any pass of the
# watchdog sees it (as a Ray agent whose raylet dies with the driver, its title over its marker)
orphan = subprocess.run(["sh", "-c", "sleep 300 > /dev/null 2>&1 & echo $!"], env={}, capture_output=True, text=True)
print(orphan.stdout.strip(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_watchdog_ends_an_orphan_of_the_command_s_last_second_by_its_process_group() -> None:
    env = marked_env()[1]
    env["PYTHONPATH"] = str(ROOT)
    command = subprocess.Popen([sys.executable, "-c", _ORPHANING], env=env, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    orphan = int(command.stdout.readline())
    try:
        command.wait(10)
        end = time.time() + 20
        while running(orphan) and time.time() < end:
            time.sleep(0.2)
        assert not running(orphan), "the orphan of the command's last second was left running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


@pytest.mark.slow
def test_killed_driver_leaves_no_process_behind(tmp_path) -> None:
    """SIGKILL of the driver alone (an OOM kill): Ray's agents, raylet, GCS and the trial workers
    all end within seconds. (Ray's own fate-sharing already did so here; the watchdog of
    studies/reaper.py is what guarantees it, and what ends `moue ui`'s server below.)"""
    spec = tmp_path / "smoke.toml"
    spec.write_text(SMOKE.read_text().replace("tokens = 4096", "tokens = 400_000"))
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    driver = subprocess.Popen(_cli("sweep", str(spec), "--workspace", str(tmp_path / "ws")), env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.time() + 240
        while not any("DashboardAgent" in n or "ImplicitFunc" in n or "trial_fn" in n
                      for n in _names(marked_pids(mark))):
            assert driver.poll() is None and time.time() < end, "no trial started"
            time.sleep(0.5)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        left = _gone(mark, 30)
        assert not left, f"left running after the driver was killed: {_described(left)}"
    finally:
        kill_marked(mark)


@pytest.mark.slow
def test_stopped_ui_leaves_no_server_behind(tmp_path) -> None:
    import socket
    import urllib.request

    ws = tmp_path / "ws"
    ws.mkdir()
    Tracker(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", experiment="x")  # a store to browse
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    ui = subprocess.Popen(_cli("ui", "--workspace", str(ws), "--port", str(port)), env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert ui.poll() is None and time.time() < end, "the UI did not start"
                time.sleep(0.5)
        ui.terminate()  # `kill PID` of the moue process alone
        ui.wait(30)
        left = _gone(mark, 30)
        assert not left, f"left running after moue ui ended: {_names(left)}"
    finally:
        kill_marked(mark)


def _diverged_store(ws: Path) -> str:
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    ws.mkdir(parents=True, exist_ok=True)
    t = Tracker(tracking_uri=uri, experiment="div")
    t.start_parent(sweep_id="div", study="div", spec_text="name = 'div'", spec_sha256="0" * 64, tags={},
                   environment={})
    for i in range(4):
        t.trial_run(f"t{i}", params={"model.d_model": 32}, tags={"moue.seed": "0"})
        t.log_metrics(f"t{i}", {"val/loss": 5.0}, step=10)
        t.finish_trial(f"t{i}", status="diverged", stop_reason="validation loss is nan")
    t.trial_run("t9", params={"model.d_model": 32}, tags={"moue.seed": "0"})
    t.finish_trial("t9", status="failed", stop_reason="boom")
    t.finish_parent()
    return uri


def test_report_on_an_all_diverged_experiment_says_how_many_diverged(tmp_path) -> None:
    ws = tmp_path / "ws"
    _diverged_store(ws)
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(_cli("report", "div", "--workspace", str(ws)), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no finished trials" in lines[0] and "4 diverged" in lines[0] and "1 failed" in lines[0]


def test_report_result_names_its_excluded_runs() -> None:
    from moue.analysis.report import ReportResult

    res = ReportResult(path=Path("r.html"), fits={}, tests={}, skipped={}, figures=(), notes=(), logged_to=(),
                       n_runs=3, excluded={"early_stopped": 3, "diverged": 1})
    assert res.runs_line() == "runs: 3 used; excluded: 1 diverged, 3 early_stopped"


def test_progress_best_ignores_diverged_trials() -> None:
    from moue.studies.runner import ProgressCallback

    class Trial:  # the two attributes the callback reads
        def __init__(self, trial_id: str) -> None:
            self.trial_id, self.config, self.last_result = trial_id, {}, {}

    cb = ProgressCallback(total=2, concurrency=2, total_tokens=0)
    a, b = Trial("a"), Trial("b")
    for t in (a, b):
        cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], a, {"tokens": 10, "val/loss": 1.2})
    cb.on_trial_result(0, [], b, {"tokens": 10, "val/loss": 3.0})
    assert cb.best == 1.2
    cb.on_trial_result(0, [], a, {"tokens": 20, "status": "diverged"})
    a.last_result = {"status": "diverged"}
    cb.on_trial_complete(0, [], a)
    assert cb.best == 3.0 and "best val 3.0000" in cb._line()
