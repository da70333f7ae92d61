"""Sweeps on real components: a local Ray, a SQLite MLflow store, a two-node loopback cluster,
an `mlflow server`, a killed driver and a killed worker."""

from __future__ import annotations

import json

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from procs import kill_marked, marked_env

from moue.studies.cluster import ensure_token
from moue.studies.runner import Workspace, run_sweep
from moue.studies.spec import load_study, shipped_studies
from moue.studies.tracking import server_env

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "studies" / "smoke.toml"
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()  # never reuse a connection to a cluster an earlier test stopped
    yield
    ray.shutdown()


def runs_of(uri: str, experiment: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("moue.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("moue.kind") == "trial"]
    return client, parents, children


def check_schema(client, parents, children, *, n_trials: int) -> None:
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    tags = parent.data.tags
    for key in ("moue.schema", "moue.study", "moue.spec_sha256", "moue.git_sha", "moue.corpus_fingerprint",
                "moue.search", "moue.scheduler", "moue.ray_storage"):
        assert tags.get(key), key
    assert tags["moue.schema"] == "1"
    assert len(children) == n_trials
    trial_ids = [c.data.tags["moue.trial_id"] for c in children]
    assert len(set(trial_ids)) == n_trials, "exactly one run per trial"
    for child in children:
        t, p, m = child.data.tags, child.data.params, child.data.metrics
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert t["moue.schema"] == "1" and t["moue.seed"] in ("0", "1")
        assert t["moue.status"] in ("finished", "early_stopped", "diverged", "failed")
        assert child.info.status != "RUNNING"
        assert child.info.run_name.startswith(f"moue {p['family']} d") and f"seed{t['moue.seed']}" in child.info.run_name
        for key in ("model.pool_size", "model.window", "model.stride", "model.top_k", "model.router",
                    "model.balance", "train.tokens", "train.lr", "data.corpus", "count.convention",
                    "derived.n_params_active", "derived.virtual_width", "derived.flops_per_token"):
            assert key in p, key
        assert {"val/loss", "train/loss", "lr", "grad_norm", "tokens_per_s", "balance/loss",
                "router/entropy"} <= set(m)
        history = client.get_metric_history(child.info.run_id, "val/loss")
        steps = [h.step for h in history]
        assert len(steps) == len(set(steps)), "no step logged twice"
        if t["moue.status"] == "finished":
            assert {"final/val_loss", "final/tokens", "final/flops", "final/wall_s", "final/train_s"} <= set(m)
            assert m["final/tokens"] == float(p["train.tokens"])


# The subprocess tests stop only the processes they started (found by a marker in their
# environment, tests/procs.py), never every Ray process on the machine.


def _moue(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from moue.studies.cli import main; main()", *args],
                            env=env or ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _write_spec(path: Path, *, tokens: int, marks: int, seeds: str = "[0, 1]", extra: str = "") -> Path:
    text = SMOKE.read_text()
    text = text.replace("tokens = 4096\nmarks = 4", f"tokens = {tokens}\nmarks = {marks}")
    text = text.replace("seeds = [0, 1]", f"seeds = {seeds}")
    text = text.replace('kind = "asha"', 'kind = "none"') + extra
    path.write_text(text)
    return path


def _wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _finished_children(uri: str) -> int:
    try:
        _, _, children = runs_of(uri, "smoke")
    except Exception:
        return 0
    return sum(1 for c in children if c.data.tags.get("moue.status") == "finished")


def _points(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric point of a run: key -> [(step, timestamp ms)]."""
    run = client.get_run(run_id)
    return {key: [(m.step, m.timestamp) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}


@pytest.mark.slow
def test_driver_killed_with_sigkill_resumes(tmp_path) -> None:
    """Killed right after trials finish (Tune saves its state only every ~10 s, so it may still
    list them as running): the resumed sweep trains none of them again and writes no metric
    point twice; the MLflow record is the source of truth."""
    spec = _write_spec(tmp_path / "smoke.toml", tokens=8192, marks=4)
    ws = tmp_path / "ws"
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    mark, env = marked_env(ENV)
    proc = _moue("sweep", str(spec), "--workspace", str(ws), env=env)
    try:
        _wait_for(lambda: _finished_children(uri) >= 2 or proc.poll() is not None, 300, "two finished trials")
        assert proc.poll() is None, proc.stdout.read()
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kill_marked(mark)  # what the killed driver's cluster left behind
    assert _finished_children(uri) < 6, "the kill came mid-way"
    client, _, before = runs_of(uri, "smoke")
    done_before = {c.info.run_id: _points(client, c.info.run_id) for c in before
                   if c.data.tags.get("moue.status") == "finished"}

    resumed = _moue("sweep", str(spec), "--workspace", str(ws), "--resume", env=env)
    try:
        out, _ = resumed.communicate(timeout=400)
    finally:
        kill_marked(mark)
    assert resumed.returncode == 0, out
    client, parents, children = runs_of(uri, "smoke")
    check_schema(client, parents, children, n_trials=6)
    assert all(c.data.tags["moue.status"] == "finished" for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert parents[0].info.status == "FINISHED"
    for child in children:
        points = _points(client, child.info.run_id)
        for key, history in points.items():
            steps = [step for step, _ in history]
            assert len(steps) == len(set(steps)), f"{key} of {child.info.run_name} written twice: {steps}"
        if child.info.run_id in done_before:
            assert points == done_before[child.info.run_id], "a trial finished before the kill was not re-trained"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_loopback_cluster_with_mlflow_server(tmp_path) -> None:
    """`ray start --head` + a second `ray start --address` node, an `mlflow server` on loopback,
    and `moue sweep --address ... --tracking-uri http://...` from a driver process."""
    port, mlflow_port = _free_port(), _free_port()
    ray_tmp = tmp_path / "raytmp"
    # a multi-node cluster cannot stay on loopback (Ray advertises the host's address): it runs
    # with token authentication, as the README asks of any cluster a user starts
    mark, env = marked_env(ENV)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ensure_token(tmp_path / "cluster_token")))
    head = subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                           "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=120)
    server = None
    try:
        assert head.returncode == 0, head.stderr
        worker = subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                                 "--num-cpus=1", "--disable-usage-stats"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stderr
        def two_nodes():  # `ray status` answers "No cluster status" for a few seconds after a start
            status = subprocess.run(["ray", "status", f"--address=127.0.0.1:{port}"], env=env,
                                    capture_output=True, text=True, timeout=60)
            return status.stdout.count("node_") >= 2

        _wait_for(two_nodes, 180, "both nodes in `ray status`")  # 90 s ran out once, both cores busy

        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
            env=server_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import urllib.request

        def healthy():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2).status == 200
            except Exception:
                return False

        _wait_for(healthy, 90, "the mlflow server")
        spec = _write_spec(tmp_path / "smoke.toml", tokens=2048, marks=2)
        uri = f"http://127.0.0.1:{mlflow_port}"
        sweep = _moue("sweep", str(spec), "--workspace", str(tmp_path / "ws"), "--address", f"127.0.0.1:{port}",
                      "--tracking-uri", uri, "--storage", str(tmp_path / "shared-storage"), env=env)
        out, _ = sweep.communicate(timeout=400)
        assert sweep.returncode == 0, out
        client, parents, children = runs_of(uri, "smoke")
        check_schema(client, parents, children, n_trials=6)
        assert parents[0].data.tags["moue.ray_storage"].startswith(str(tmp_path / "shared-storage"))
        import json

        nodes = set()
        for result in (tmp_path / "shared-storage" / "smoke").glob("*/result.json"):
            nodes |= {json.loads(line).get("node_id") for line in result.read_text().splitlines() if line}
        nodes.discard(None)
        assert len(nodes) == 2, f"trials ran on both nodes: {nodes}"
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
        kill_marked(mark)  # the two nodes this test started, nothing else
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_smoke_sweep_on_local_ray_and_sqlite(local_ray, tmp_path) -> None:
    study = load_study(SMOKE)
    ws = Workspace.at(tmp_path / "ws")
    outcome = run_sweep(study, workspace=ws)
    assert outcome.trials == 6
    client, parents, children = runs_of(ws.tracking_uri, "smoke")
    check_schema(client, parents, children, n_trials=6)
    exp = client.get_experiment_by_name("smoke")  # opens on MLflow 3's runs view, with the study's description
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["mlflow.note.content"] == study.description
    statuses = [c.data.tags["moue.status"] for c in children]
    assert "early_stopped" in statuses, "ASHA stops some trials"
    assert "finished" in statuses
    stopped = [c for c in children if c.data.tags["moue.status"] == "early_stopped"]
    assert all(c.data.metrics["final/tokens"] < study.budget_tokens for c in stopped)
    assert parents[0].info.status == "FINISHED"
    # after the sweep each trial keeps only the checkpoint Tune registered (prune_checkpoints);
    # marks = 4 wrote up to 4 per trial
    trial_dirs = [d for d in (ws.ray / "smoke").iterdir() if d.is_dir() and d.name.startswith("trial_fn")]
    assert len(trial_dirs) == 6
    assert all(len(list(d.glob("checkpoint_*"))) == 1 for d in trial_dirs), \
        {d.name: sorted(p.name for p in d.glob("checkpoint_*")) for d in trial_dirs}
    art = client.list_artifacts(parents[0].info.run_id)
    assert {"spec.toml", "environment.json"} <= {a.path for a in art}
    # a second launch without --resume refuses (exit 2 path), nothing new written
    from moue.errors import ConfigError

    with pytest.raises(ConfigError, match="pass --resume"):
        run_sweep(study, workspace=ws)
    assert len(runs_of(ws.tracking_uri, "smoke")[2]) == 6


def _kind(study) -> tuple:
    """What a smoke sweep of a study exercises: its space, search, scheduler, one or several
    budgets, cooldown branches, an LR stage, an adaptive design."""
    branches = any(p.config.train.cooldown_at for p in study.plans)
    return (study.search.space, study.search.algorithm, study.scheduler.kind, len(study.budgets) > 1, branches,
            study.lr_stage is not None, study.design is not None)


# one shipped study of each kind runs a smoke sweep (``smoke.toml`` has its own tests); the others
# differ from theirs only in settings that every study's load and dry run check (test_specs.py)
SMOKE_SWEEPS = ("virtual_width.toml", "vw_scaling.toml", "ladder.toml", "quickstart.toml", "conversion.toml",
                "gate.toml", "lr.toml", "pool_size.toml", "rotation.toml", "router_balance.toml")
# smoke sweeps run by their own tests (an adaptive design trains a subset of its grid)
SMOKE_ELSEWHERE = ("adaptive.toml",)  # tests/test_adaptive.py::test_smoke_runs_adaptively_into_mlflow_and_the_report


def test_the_smoke_sweeps_cover_every_kind_of_shipped_study() -> None:
    kinds = {p.name: _kind(load_study(p, smoke=True)) for p in shipped_studies()}
    covered = {kinds[name] for name in (*SMOKE_SWEEPS, *SMOKE_ELSEWHERE)} | {kinds["smoke.toml"]}
    missing = {name: kind for name, kind in kinds.items() if kind not in covered}
    assert not missing, f"add a study of each kind to SMOKE_SWEEPS: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("spec", SMOKE_SWEEPS)
def test_shipped_studies_run_as_smoke(spec: str, local_ray, tmp_path) -> None:
    study = load_study(ROOT / "studies" / spec, smoke=True)
    ws = Workspace.at(tmp_path / "ws")
    outcome = run_sweep(study, workspace=ws)
    n = len(study.points) if study.search.algorithm == "grid" else study.search.num_samples
    assert outcome.trials == n
    client, parents, children = runs_of(ws.tracking_uri, study.experiment)
    assert len(parents) == 1 and len(children) == n
    assert all(c.data.tags["moue.status"] in ("finished", "early_stopped") for c in children), \
        [(c.data.tags["moue.status"], c.data.tags.get("moue.stop_reason")) for c in children]
    if spec == "conversion.toml":
        assert (ws.root / "conversion" / "conversion-smoke-base.pt").is_file()
        windows = sorted({int(c.data.params["model.window"]) for c in children})
        assert len(windows) >= 2  # the control and a widened window
    if spec == "ladder.toml":  # every size's cooldown branches reach MLflow as final/cooldown/<t>/*
        for c in children:
            at = [int(t) for t in json.loads(c.data.params["config.json"])["train.cooldown_at"]]
            assert at and all(f"final/cooldown/{t}/val_loss" in c.data.metrics for t in at)
    if len(study.budgets) > 1:  # every trial ran its own budget
        assert sorted({int(c.data.metrics["final/tokens"]) for c in children}) == list(study.budgets)
        assert all(int(c.data.metrics["final/tokens"]) == int(c.data.params["train.tokens"]) for c in children)


@pytest.mark.slow
def test_killed_worker_is_retried_from_its_checkpoint(local_ray, tmp_path) -> None:
    import threading

    spec = _write_spec(tmp_path / "smoke.toml", tokens=16384, marks=8, seeds="[0]")
    study = load_study(spec)
    ws = Workspace.at(tmp_path / "ws")
    killed: list[int] = []

    def killer() -> None:
        # wait until some trial has checkpointed past its first mark, then kill that trial's process
        def victim():
            try:
                client, _, children = runs_of(ws.tracking_uri, "smoke")
            except Exception:
                return None
            for c in children:
                hist = client.get_metric_history(c.info.run_id, "val/loss")
                if len(hist) >= 4 and c.data.tags.get("moue.status") is None:
                    out = subprocess.run(["pgrep", "-f", "ImplicitFunc"], capture_output=True, text=True)
                    pids = [int(x) for x in out.stdout.split()]
                    return pids or None
            return None

        pids = _wait_for(victim, 240, "a trial past its third mark")
        # every checkpoint after the second of every trial goes bad (a torn copy). The trial
        # whose fourth mark MLflow has is registered in Tune at checkpoint 3 or later, so once
        # killed it must skip the torn ones, resume from checkpoint 1 (past step 0) and say so
        for trial_dir in (ws.ray / "smoke").glob("*/"):
            for folder in sorted(trial_dir.glob("checkpoint_*"))[2:]:
                state = folder / "state.pt"
                if state.is_file():
                    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        for pid in pids:  # every running trial, the corrupted ones among them
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcome = run_sweep(study, workspace=ws)
    thread.join(5)
    assert killed, "no worker was killed"
    client, parents, children = runs_of(ws.tracking_uri, "smoke")
    check_schema(client, parents, children, n_trials=3)
    assert outcome.statuses == {"finished": 3}
    restored = [c for c in children if "trial/restored_from" in c.data.metrics]
    assert restored, "a trial resumed from a checkpoint"
    fell_back = [c for c in restored if c.data.metrics.get("trial/corrupt_checkpoints", 0) >= 1]
    assert fell_back and all(c.data.metrics["trial/restored_from"] > 0 for c in fell_back), \
        "a killed trial skipped its corrupt checkpoint and was restored from the earlier one"




def test_prune_keeps_the_registered_checkpoint_not_the_newest_folder(tmp_path) -> None:
    """A folder Tune never registered (a worker died while writing it) must not survive in place
    of the registered one; a trial with no registered checkpoint is left alone."""
    from types import SimpleNamespace

    from pyarrow.fs import LocalFileSystem

    from moue.studies.runner import prune_checkpoints

    trial = tmp_path / "trial_a"
    for n in (0, 1, 2):
        (trial / f"checkpoint_00000{n}").mkdir(parents=True)
    (trial / "result.json").write_text("{}")
    other = tmp_path / "trial_b"
    (other / "checkpoint_000000").mkdir(parents=True)
    fs = LocalFileSystem()
    results = [SimpleNamespace(checkpoint=SimpleNamespace(path=str(trial / "checkpoint_000001")), path=str(trial),
                               filesystem=fs),
               SimpleNamespace(checkpoint=None, path=str(other), filesystem=fs)]
    assert prune_checkpoints(results) == 2
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000001", "result.json"]
    assert (other / "checkpoint_000000").is_dir()
