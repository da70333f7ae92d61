"""moue.studies.tracking against real MLflow stores: SQLite files and an `mlflow server` on loopback.

Nothing is mocked. The only instrumentation is a counting wrapper around the client's
``log_batch`` (the store behind it stays real), and per-key logging calls replaced by ones that
fail, so a per-key implementation cannot pass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from moue.studies.tracking import ORPHAN_REASON, Tracker, environment_info, git_info

ROOT = Path(__file__).resolve().parents[1]
SPEC = 'name = "toy"\n[search]\nalgorithm = "grid"\n'
KEYS = ("train/loss", "val/loss", "lr", "grad_norm", "balance/load_cv")
STEPS = (0, 256, 512, 768)


def _params(i: int) -> dict:
    # 150 params: more than one log_batch's worth (100), of several types.
    extra = {f"derived.x{j:03d}": j * 0.5 for j in range(143)}
    return {"model.d_model": 64, "model.pool_size": 8 * (i + 1), "model.router": "softmax",
            "model.expert_bias": i % 2 == 0, "model.gammas": [1.0, 0.5], "train.lr": 3e-3,
            "data.corpus": None, **extra}


def _report(step: int, i: int) -> dict:
    base = {k: 1.0 + i + step / 1000 + n for n, k in enumerate(KEYS)}
    return {**base, "status": "running", "note": None, "done": False, "bad": math.nan,
            "worse": math.inf}


class Spy:
    """Counts log_batch calls (run id and sizes) and fails on any per-key logging call."""

    def __init__(self, client: MlflowClient) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        real = client.log_batch

        def log_batch(run_id, metrics=(), params=(), tags=(), synchronous=None):
            self.calls.append((run_id, len(metrics), len(params), len(tags)))
            return real(run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

        def per_key(*args, **kwargs):
            raise AssertionError("per-key logging call: docs/TRACKING.md asks for log_batch")

        client.log_batch = log_batch
        client.log_metric = client.log_param = client.set_tag = per_key

    def n_params(self) -> int:
        return sum(c[2] for c in self.calls)

    def n_metrics(self) -> int:
        return sum(c[1] for c in self.calls)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated SQLite store; tests copy it (creating one costs seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(template_db, tmp_path) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _start(tracker: Tracker, sweep_id: str = "sweep-1") -> str:
    return tracker.start_parent(
        sweep_id=sweep_id, study="toy", spec_text=SPEC, spec_sha256="abc123",
        tags={"moue.git_sha": "deadbeef", "moue.git_dirty": "false",
              "moue.corpus_fingerprint": "fp0", "moue.search": "grid", "moue.scheduler": "asha",
              "moue.ray_storage": "/tmp/ray"},
        environment={"python": "3.11", "versions": {"mlflow": "3"}, "gpus": []})


def _trial(tracker: Tracker, i: int) -> str:
    return tracker.trial_run(f"t{i}", params=_params(i), tags={"moue.seed": str(100 + i)})


def _search(client: MlflowClient, exp_id: str, flt: str) -> list:
    return client.search_runs([exp_id], filter_string=flt, max_results=1000)


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _run_sweep(uri: str, tmp_path: Path) -> tuple[Tracker, Spy, str, list[str]]:
    """Three trials (finished, early_stopped, diverged) with reports at STEPS."""
    tracker = Tracker(tracking_uri=uri, experiment="toy", flush_every=50)
    spy = Spy(tracker.client)
    parent = _start(tracker)
    runs = [_trial(tracker, i) for i in range(3)]
    for step in STEPS:
        for i in range(3):
            if i == 2 and step > 256:
                continue  # t2 diverges after two marks
            tracker.log_metrics(f"t{i}", _report(step, i), step)
    final = {"final/val_loss": 2.5, "final/tokens": 768, "final/flops": 1e9, "final/wall_s": 3.0,
             "final/train_s": 2.0}
    tracker.finish_trial("t0", status="finished", final=final)
    tracker.finish_trial("t1", status="early_stopped", stop_reason="asha", final=final)
    tracker.finish_trial("t2", status="diverged", stop_reason="loss nan at step 3", final=final)
    report = tmp_path / "report.html"
    report.write_text("<html>r</html>")
    tracker.log_parent_artifact(str(report), "reports")
    tracker.finish_parent()
    return tracker, spy, parent, runs


def _check_sweep(uri: str, tracker: Tracker, spy: Spy, parent: str, runs: list[str],
                 tmp_path: Path, keys: tuple[str, ...] = KEYS) -> None:
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("toy").experiment_id
    parents = _search(client, exp_id, "tags.`moue.kind` = 'study'")
    assert [p.info.run_id for p in parents] == [parent]
    p = parents[0]
    assert p.info.status == "FINISHED"
    assert {k: p.data.tags[k] for k in ("moue.kind", "moue.schema", "moue.study", "moue.sweep_id",
                                        "moue.spec_sha256", "moue.git_sha", "moue.scheduler",
                                        "moue.ray_storage", "moue.corpus_fingerprint")} == {
        "moue.kind": "study", "moue.schema": "1", "moue.study": "toy", "moue.sweep_id": "sweep-1",
        "moue.spec_sha256": "abc123", "moue.git_sha": "deadbeef", "moue.scheduler": "asha",
        "moue.ray_storage": "/tmp/ray", "moue.corpus_fingerprint": "fp0"}
    spec = client.download_artifacts(parent, "spec.toml", str(tmp_path))
    assert Path(spec).read_text() == SPEC
    env = json.loads(Path(client.download_artifacts(parent, "environment.json", str(tmp_path)))
                     .read_text())
    assert env == {"python": "3.11", "versions": {"mlflow": "3"}, "gpus": []}
    assert [f.path for f in client.list_artifacts(parent, "reports")] == ["reports/report.html"]

    children = _search(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.info.run_id for c in children) == sorted(runs)
    by_trial = {c.data.tags["moue.trial_id"]: c for c in children}
    assert sorted(by_trial) == ["t0", "t1", "t2"]
    expected = {"t0": ("finished", "", "FINISHED"), "t1": ("early_stopped", "asha", "FINISHED"),
                "t2": ("diverged", "loss nan at step 3", "FINISHED")}
    for i, (tid, (status, reason, run_status)) in enumerate(expected.items()):
        run = by_trial[tid]
        tags = run.data.tags
        assert (tags["moue.kind"], tags["moue.schema"], tags["moue.seed"]) == ("trial", "1",
                                                                               str(100 + i))
        assert (tags["moue.status"], tags["moue.stop_reason"], run.info.status) == (
            status, reason, run_status)
        assert run.data.params == {k: str(v) for k, v in _params(i).items()}
        steps = list(STEPS) if tid != "t2" else [0, 256]
        for key in keys:
            assert _history(client, run.info.run_id, key) == steps, (tid, key)
        assert client.get_metric_history(run.info.run_id, "val/loss")[-1].value == pytest.approx(
            _report(steps[-1], i)["val/loss"])
        finals = {k for k in run.data.metrics if k.startswith("final/")}
        assert finals == (set() if tid == "t2" else {"final/val_loss", "final/tokens",
                                                     "final/flops", "final/wall_s",
                                                     "final/train_s"})
        assert not {"status", "note", "done", "bad", "worse"} & set(run.data.metrics)

    # Batched: params in 2 batches per trial (150 > 100), metrics in few calls, never per key.
    assert spy.n_params() == 3 * 150
    assert len([c for c in spy.calls if c[2]]) == 3 * 2
    n_points = (2 * len(STEPS) + 2) * len(KEYS)
    metric_calls = [c for c in spy.calls if c[1]]
    assert spy.n_metrics() == n_points + 2 * 5
    assert len(metric_calls) <= 8, metric_calls


def test_sweep_on_sqlite(sqlite_uri, tmp_path):
    tracker, spy, parent, runs = _run_sweep(sqlite_uri, tmp_path)
    _check_sweep(sqlite_uri, tracker, spy, parent, runs, tmp_path)
    # Artifacts live next to the store: <dir of mlflow.db>/artifacts/<experiment>.
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.artifact_location == (tmp_path / "artifacts" / "toy").as_uri()
    assert (tmp_path / "artifacts" / "toy" / parent / "artifacts" / "spec.toml").read_text() == SPEC


def test_sweep_loads_with_the_analysis_loader(sqlite_uri, tmp_path):
    from moue.analysis.loading import load_runs

    _, _, parent, _ = _run_sweep(sqlite_uri, tmp_path)
    loaded = load_runs("toy", tracking_uri=sqlite_uri, parent_run_id=parent,
                       include_statuses=("finished", "early_stopped"))
    assert loaded.frame.height == 2 and dict(loaded.excluded) == {"diverged": 1}
    assert sorted(loaded.frame.get_column("model.pool_size").to_list()) == [8, 16]
    assert sorted(loaded.frame.get_column("seed").to_list()) == [100, 101]


def test_driver_restart_reuses_runs_and_dedups(sqlite_uri):
    first = Tracker(tracking_uri=sqlite_uri, experiment="toy", flush_every=1)
    parent = _start(first)
    runs = [_trial(first, i) for i in range(2)]
    for step in STEPS[:3]:
        first.log_metrics("t0", _report(step, 0), step)
        first.log_metrics("t1", _report(step, 1), step)
    del first  # the driver dies; nothing is finished

    second = Tracker(tracking_uri=sqlite_uri, experiment="toy", flush_every=1000)
    spy = Spy(second.client)
    assert _start(second) == parent
    assert second.client.get_run(parent).info.status == "RUNNING"
    assert [_trial(second, i) for i in range(2)] == runs
    assert spy.n_params() == 0  # already there: not logged again
    for step in (*STEPS[:3], STEPS[:3][-1]):  # restored trials re-report the marks they logged
        second.log_metrics("t0", _report(step, 0), step)
    second.flush()
    assert spy.n_metrics() == 0
    second.log_metrics("t0", _report(STEPS[3], 0), STEPS[3])
    second.log_metrics("t0", _report(STEPS[3], 0), STEPS[3])  # twice in one process: once
    second.finish_trial("t0", status="finished", final={"final/val_loss": 2.0})
    assert spy.n_metrics() == len(KEYS) + 1
    second.finish_parent()

    client = MlflowClient(tracking_uri=sqlite_uri)
    exp_id = client.get_experiment_by_name("toy").experiment_id
    assert len(_search(client, exp_id, "tags.`moue.kind` = 'study'")) == 1
    children = _search(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.info.run_id for c in children) == sorted(runs)
    assert _history(client, runs[0], "val/loss") == list(STEPS)
    assert _history(client, runs[1], "val/loss") == list(STEPS[:3])
    assert {c.data.tags["moue.trial_id"]: c.info.status for c in children} == {
        "t0": "FINISHED", "t1": "KILLED"}

    third = Tracker(tracking_uri=sqlite_uri, experiment="toy")
    _start(third)
    with pytest.raises(ValueError, match="model.pool_size"):  # a param cannot change on resume
        third.trial_run("t1", params={**_params(1), "model.pool_size": 99},
                        tags={"moue.seed": "101"})
    with pytest.raises(ValueError, match="spec sha256"):
        third.start_parent(sweep_id="sweep-1", study="toy", spec_text=SPEC, spec_sha256="other",
                           tags={}, environment={})


def test_a_restored_write_queue_finds_its_trials_runs(sqlite_uri):
    """The driver's writer queue is saved with Tune's checkpoint: a restored driver writes its
    items before it has re-attached their trials (their runs are found under the parent), and a
    write the killed driver had already done is not done twice."""
    first = Tracker(tracking_uri=sqlite_uri, experiment="toy", flush_every=1)
    parent = _start(first)
    run = _trial(first, 0)
    first.log_metrics("t0", _report(STEPS[0], 0), STEPS[0])
    del first

    second = Tracker(tracking_uri=sqlite_uri, experiment="toy", flush_every=1000)
    assert _start(second) == parent
    spy = Spy(second.client)
    for step in STEPS[:2]:  # the queue: a step already written, then one that was not
        second.log_metrics("t0", _report(step, 0), step)
    second.finish_trial("t0", status="finished", final={"final/val_loss": 2.0})
    assert spy.n_metrics() == len(KEYS) + 1
    with pytest.raises(KeyError, match="no run yet"):  # a trial the store does not know
        second.log_metrics("t9", _report(STEPS[0], 0), STEPS[0])
    second.finish_parent()
    client = MlflowClient(tracking_uri=sqlite_uri)
    assert _history(client, run, "val/loss") == list(STEPS[:2])
    assert client.get_run(run).data.tags["moue.status"] == "finished"


_CRASHING_DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_tracking import STEPS, _report, _start, _trial
    from moue.studies.tracking import Tracker
    tracker = Tracker(tracking_uri=sys.argv[1], experiment="toy", flush_every=1)
    _start(tracker)
    for i in range(2):
        _trial(tracker, i)
    for step in STEPS[:2]:
        for i in range(2):
            tracker.log_metrics(f"t{i}", _report(step, i), step)
    print(tracker.parent_run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_restart_after_a_killed_driver_process(sqlite_uri):
    proc = subprocess.run([sys.executable, "-c", _CRASHING_DRIVER, sqlite_uri, str(ROOT / "tests")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    parent = proc.stdout.split()[-1]

    tracker = Tracker(tracking_uri=sqlite_uri, experiment="toy")
    spy = Spy(tracker.client)
    assert _start(tracker) == parent
    runs = [_trial(tracker, i) for i in range(2)]
    assert spy.n_params() == 0
    for step in STEPS:  # from the start: the first two marks are already in the store
        for i in range(2):
            tracker.log_metrics(f"t{i}", _report(step, i), step)
    for i in range(2):
        tracker.finish_trial(f"t{i}", status="finished", final={"final/val_loss": 1.0})
    tracker.finish_parent()
    assert spy.n_metrics() == 2 * 2 * len(KEYS) + 2

    client = MlflowClient(tracking_uri=sqlite_uri)
    exp_id = client.get_experiment_by_name("toy").experiment_id
    everything = _search(client, exp_id, "")
    assert len(everything) == 3  # one parent, two children: nothing duplicated
    assert all(r.info.status == "FINISHED" for r in everything)
    for run_id in runs:
        for key in KEYS:
            assert _history(client, run_id, key) == list(STEPS)


def test_orphans_failures_and_bad_input(sqlite_uri, tmp_path):
    tracker = Tracker(tracking_uri=sqlite_uri, experiment="toy")
    with pytest.raises(RuntimeError, match="start_parent"):
        _trial(tracker, 0)
    parent = _start(tracker)
    runs = [_trial(tracker, i) for i in range(3)]
    with pytest.raises(KeyError, match="trial_run"):
        tracker.log_metrics("nope", {"val/loss": 1.0}, 0)
    with pytest.raises(ValueError, match="moue.seed"):
        tracker.trial_run("t9", params={}, tags={})
    with pytest.raises(ValueError, match="moue.kind"):
        tracker.trial_run("t9", params={}, tags={"moue.seed": "1", "moue.kind": "study"})
    with pytest.raises(ValueError, match="crashed.*finished, early_stopped, diverged, failed"):
        tracker.finish_trial("t0", status="crashed")
    with pytest.raises(ValueError, match="BOGUS"):
        tracker.finish_parent("BOGUS")
    with pytest.raises(ValueError, match="absolute"):
        Tracker(tracking_uri="sqlite:///relative/mlflow.db", experiment="toy")

    tracker.log_metrics("t0", _report(0, 0), 0)
    tracker.finish_trial("t0", status="finished", final={"final/val_loss": 1.5})
    tracker.finish_trial("t1", status="failed", stop_reason="worker died",
                         final={"final/val_loss": 1.5})
    tracker.log_metrics("t2", _report(0, 2), 0)  # t2 is still running when the sweep ends
    tracker.finish_parent()

    client = tracker.client
    got = {r: client.get_run(r) for r in runs}
    assert [got[r].info.status for r in runs] == ["FINISHED", "FAILED", "KILLED"]
    assert got[runs[1]].data.tags["moue.status"] == "failed"
    assert "final/val_loss" not in got[runs[1]].data.metrics
    assert (got[runs[2]].data.tags["moue.status"], got[runs[2]].data.tags["moue.stop_reason"]) == (
        "failed", ORPHAN_REASON)
    assert _history(client, runs[2], "val/loss") == [0]  # its buffer was flushed first
    assert client.get_run(parent).info.status == "FINISHED"


def test_environment_and_git_info(tmp_path):
    import mlflow

    env = environment_info()
    json.dumps(env)
    assert env["versions"]["mlflow"] == mlflow.__version__
    assert env["cpu_count"] == os.cpu_count() and isinstance(env["gpus"], list)
    if shutil.which("nvidia-smi") is None:
        assert (env["gpus"], env["cuda"]) == ([], "")

    assert git_info(tmp_path) == {"moue.git_sha": "unknown", "moue.git_dirty": "unknown"}
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_info(tmp_path) == {"moue.git_sha": sha, "moue.git_dirty": "false"}
    (tmp_path / "untracked.txt").write_text("ignored for dirtiness")
    assert git_info(tmp_path)["moue.git_dirty"] == "false"
    (tmp_path / "a.txt").write_text("2")
    assert git_info(tmp_path)["moue.git_dirty"] == "true"


# ---- a real tracking server on loopback


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, template_db):
    from moue.studies.tracking import loopback_server

    root = tmp_path_factory.mktemp("server")
    shutil.copy(template_db, root / "db.sqlite")  # already migrated: the server starts faster
    try:
        with loopback_server(root, db=root / "db.sqlite", wait_s=90) as url:
            yield url, root / "server-artifacts"
    except RuntimeError as exc:  # raised only when the server does not start
        pytest.skip(str(exc))


def test_sweep_on_an_mlflow_server(mlflow_server, tmp_path):
    url, artifacts = mlflow_server
    tracker, spy, parent, runs = _run_sweep(url, tmp_path)
    _check_sweep(url, tracker, spy, parent, runs, tmp_path, keys=("val/loss",))
    stored = sorted(p.name for p in artifacts.rglob("*") if p.is_file())
    assert stored == ["environment.json", "report.html", "spec.toml"]

    again = Tracker(tracking_uri=url, experiment="toy")  # a restarted driver, over HTTP
    again_spy = Spy(again.client)
    assert _start(again) == parent
    assert [_trial(again, i) for i in range(3)] == runs
    again.log_metrics("t0", _report(STEPS[-1], 0), STEPS[-1])
    again.finish_parent()
    assert again_spy.n_params() == 0 and again_spy.n_metrics() == 0
    client = MlflowClient(tracking_uri=url)
    assert len(_search(client, tracker.experiment_id, "")) == 4


def test_servers_moue_starts_leave_mlflow_job_execution_off_unless_the_user_set_it():
    from moue.studies.tracking import server_env

    env = server_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    assert server_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
