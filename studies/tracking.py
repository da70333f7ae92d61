"""Driver-side MLflow writer: one parent run per sweep, one child run per trial (docs/TRACKING.md).

Only the Ray driver writes to MLflow (the sweep runner wraps :class:`Tracker` in a Tune callback),
so a SQLite store on the driver is safe; a team points ``tracking_uri`` at an ``mlflow server``.
This module imports no Ray.

Idempotency, so that a restarted driver (``moue sweep --resume``) keeps every run:

- the parent is found by its ``moue.sweep_id`` tag and set RUNNING again, never duplicated;
- a child is found by ``mlflow.parentRunId`` + ``moue.trial_id``; params already on it are not
  logged again (MLflow refuses to change a param);
- metrics are deduplicated per run and key by step: a trial restored from a checkpoint re-reports
  marks it already reported, and those are dropped. On re-attaching to an existing child, the
  largest step of ``val/loss`` (reported at every mark) is read once and every report at or
  below it is dropped.

Everything is written with ``log_batch`` (metrics buffered, ``flush_every`` at a time).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import numbers
import operator
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from moue.tracking_contract import (VIEW_TAG, view_state, DONE, KIND, KIND_STUDY, KIND_TRIAL, PARENT_RUN, SCHEMA, SCHEMA_VERSION, SEED,
                                         FINAL_VAL_LOSS, STATUS, STATUSES, STOP_REASON, SWEEP_ID, TRIAL_ID, VAL_LOSS,
                                         search_runs)

__all__ = ["SCHEMA_VERSION", "STATUSES", "DONE", "RecordedSweep", "Tracker", "check_tracking_uri", "environment_info",
           "git_info", "log_study_summary", "probe_tracking_uri", "recorded_sweep", "server_env", "sweep_state"]

ORPHAN_REASON = "sweep ended while the trial was running"
_MAX_METRICS_PER_BATCH = 1000  # MLflow LogBatch limits (REST API docs: "Request Limits")
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow >= 2.x
_DEDUP_KEY = VAL_LOSS  # reported at every mark (moue.train), so its last step is the floor
_VERSIONED = ("torch", "ray", "mlflow", "optuna", "polars", "numpy", "moue")


def _quote(field: str, value: str) -> str:
    """``value`` as a filter-string literal; ids with quotes are refused rather than escaped."""
    if "'" in value or "\\" in value:
        raise ValueError(f"{field} {value!r} must not contain quotes or backslashes")
    return f"'{value}'"


def _with_fixed(field: str, given: Mapping[str, Any], fixed: Mapping[str, str]) -> dict[str, str]:
    """``given`` tags (as strings) plus ``fixed`` ones; a given tag may not contradict a fixed one."""
    out = {k: str(v) for k, v in given.items()}
    for key, value in fixed.items():
        if key in out and out[key] != value:
            raise ValueError(f"{field}[{key!r}] = {out[key]!r} conflicts with the value set by "
                             f"the tracker ({value!r}); leave it out")
        out[key] = value
    return out


EXPERIMENT_KIND = "mlflow.experimentKind"


class Tracker:
    """Writes one sweep to MLflow: ``start_parent``, then ``trial_run`` / ``log_metrics`` /
    ``finish_trial`` per trial, then ``finish_parent``. Errors from MLflow propagate."""

    def __init__(self, *, tracking_uri: str, experiment: str, flush_every: int = 50, description: str = "") -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every = {flush_every!r} must be >= 1")
        if tracking_uri.startswith("sqlite:") and not tracking_uri.startswith("sqlite:////"):
            raise ValueError(f"tracking_uri = {tracking_uri!r} must be an absolute SQLite URI, "
                             "sqlite:////abs/path/mlflow.db (trials run in other directories)")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.flush_every = flush_every
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._experiment_id()
        # MLflow 3's UI opens an experiment of this kind on its runs (model training), not the GenAI
        # overview; the study's description is the experiment's
        self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG, json.dumps(view_state()))
        if description:
            self.client.set_experiment_tag(self.experiment_id, "mlflow.note.content", description)
        self._parent_id: str | None = None
        self._children: dict[str, str] = {}  # trial_id -> run_id, for this parent
        self._existing: dict[str, Any] = {}  # trial_id -> Run found in the store, not yet attached
        self._last_step: dict[str, dict[str, int]] = {}  # run_id -> key -> last step logged
        self._floor: dict[str, int] = {}  # run_id -> steps at or below this were logged before
        self._pending: dict[str, list[Metric]] = {}  # run_id -> buffered metrics
        self._n_pending = 0
        self._closed: set[str] = set()  # runs whose trial was done before this driver attached

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_id

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise ValueError(f"experiment {self.experiment!r} is deleted in {self.tracking_uri}; "
                                 "restore it (mlflow experiments restore) or use another name")
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:////"):
            # Artifacts next to the store: <dir of mlflow.db>/artifacts/<experiment>.
            folder = re.sub(r"[^A-Za-z0-9._-]", "_", self.experiment)
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            location = (db.parent / "artifacts" / folder).as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def _search(self, filter_string: str) -> list:
        return search_runs(self.client, self.experiment_id, filter_string)

    # ---- parent

    def start_parent(self, *, sweep_id: str, study: str, spec_text: str, spec_sha256: str,
                     tags: Mapping[str, str], environment: Mapping[str, Any]) -> str:
        """Create the sweep's parent run, or reuse the one tagged with ``sweep_id`` (a resumed sweep:
        set RUNNING again; its spec must have the same ``spec_sha256``). Returns its run id."""
        self.flush()
        found = self._search(f"tags.`moue.sweep_id` = {_quote('sweep_id', sweep_id)} "
                             "and tags.`moue.kind` = 'study'")
        if found:
            run = found[0]  # the oldest, should an earlier bug have left two
            if run.data.tags.get("moue.spec_sha256") != spec_sha256:
                raise ValueError(f"sweep {sweep_id!r} was started with spec sha256 "
                                 f"{run.data.tags.get('moue.spec_sha256')}, not {spec_sha256}; "
                                 "resume it with the same spec or start a new sweep")
            self._children, self._existing = {}, {}
            self._parent_id = run.info.run_id
            if run.info.status != "RUNNING":
                self.client.update_run(self._parent_id, status="RUNNING")
            present = {f.path for f in self.client.list_artifacts(self._parent_id)}
            children = self._search(f"tags.`mlflow.parentRunId` = '{self._parent_id}' "
                                    "and tags.`moue.kind` = 'trial'")
            for child in children:
                self._existing.setdefault(child.data.tags.get(TRIAL_ID, ""), child)
        else:
            fixed = {KIND: KIND_STUDY, SCHEMA: str(SCHEMA_VERSION), "moue.study": study,
                     "moue.spec_sha256": spec_sha256, SWEEP_ID: sweep_id}
            run = self.client.create_run(self.experiment_id, run_name=sweep_id,
                                         tags=_with_fixed("tags", tags, fixed))
            self._children, self._existing = {}, {}
            self._parent_id = run.info.run_id
            present = set()
        if "spec.toml" not in present:
            self.client.log_text(self._parent_id, spec_text, "spec.toml")
        if "environment.json" not in present:
            self.client.log_dict(self._parent_id, dict(environment), "environment.json")
        return self._parent_id

    def log_parent_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file (a report, a fit) to the parent run, under ``artifact_path`` if given."""
        self.client.log_artifact(self._require_parent(), local_path, artifact_path)

    def finish_parent(self, status: str = "FINISHED") -> None:
        """Flush, close every child of this parent still RUNNING as KILLED with
        ``moue.status = failed`` (no orphans), then terminate the parent with ``status``."""
        parent = self._require_parent()
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"parent status {status!r} is not one of FINISHED, FAILED, KILLED")
        self.flush()
        running = self._search(f"tags.`mlflow.parentRunId` = '{parent}' "
                               "and attributes.status = 'RUNNING'")
        for run in running:
            self.client.log_batch(run.info.run_id, tags=[RunTag(STATUS, "failed"),
                                                         RunTag(STOP_REASON, ORPHAN_REASON)],
                                  synchronous=True)
            self.client.set_terminated(run.info.run_id, status="KILLED")
        self.client.set_terminated(parent, status=status)

    def _require_parent(self) -> str:
        if self._parent_id is None:
            raise RuntimeError("no parent run: call Tracker.start_parent(...) first")
        return self._parent_id

    # ---- trials

    def trial_run(self, trial_id: str, *, params: Mapping[str, Any], tags: Mapping[str, str],
                  run_name: str | None = None) -> str:
        """The child run of ``trial_id``: cached, found under the parent, or created.

        ``tags`` must hold ``moue.seed``. Params are logged as strings (values longer than MLflow's
        limit are cut to it), in batches, and only those not already on the run.
        """
        if trial_id in self._children:
            return self._children[trial_id]
        parent = self._require_parent()
        if SEED not in tags:
            raise ValueError(f"tags of trial {trial_id!r} lack 'moue.seed' (docs/TRACKING.md)")
        _quote("trial_id", trial_id)
        fixed = {PARENT_RUN: parent, KIND: KIND_TRIAL,
                 SCHEMA: str(SCHEMA_VERSION), TRIAL_ID: trial_id}
        all_tags = _with_fixed("tags", tags, fixed)
        values = {k: str(v)[:_MAX_PARAM_VALUE] for k, v in params.items()}
        run = self._existing.pop(trial_id, None)
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name or trial_id, tags=all_tags)
            logged: Mapping[str, str] = {}
        else:  # re-attach after a driver restart
            logged = run.data.params
            for key, value in values.items():
                if key in logged and logged[key] != value:
                    raise ValueError(f"param {key!r} of trial {trial_id!r} is {value!r} now but "
                                     f"{logged[key]!r} in run {run.info.run_id}; MLflow cannot "
                                     "change a param, and a resumed trial should not")
            self._reattach(trial_id, run)
        run_id = run.info.run_id
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        for lo in range(0, len(new), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[lo:lo + _MAX_PARAMS_PER_BATCH],
                                  synchronous=True)
        self._children[trial_id] = run_id
        return run_id

    def log_metrics(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer the numeric, finite values of ``metrics`` at ``step`` (tokens seen).

        Strings, None, bools and non-numbers are skipped, and so are NaN and +-inf (a diverged
        trial is recorded by its status tag, not by a non-finite point). A (key, step) already
        logged to this trial's run, or at or below the step it had reached before a driver
        restart, is dropped. The buffer is written with ``log_batch`` once it holds
        ``flush_every`` metrics, on :meth:`flush` and in ``finish_*``.
        """
        run_id = self._run_of(trial_id)
        step = operator.index(step)
        if run_id in self._closed:
            return
        floor = self._floor.get(run_id, -1)
        last = self._last_step.setdefault(run_id, {})
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            value = float(value)
            if not math.isfinite(value) or step <= floor or step <= last.get(key, -1):
                continue
            last[key] = step
            self._pending.setdefault(run_id, []).append(Metric(key, value, now, step))
            self._n_pending += 1
        if self._n_pending >= self.flush_every:
            self.flush()

    def finish_trial(self, trial_id: str, *, status: str, stop_reason: str = "",
                     final: Mapping[str, float] | None = None) -> None:
        """Tag ``moue.status`` / ``moue.stop_reason``, log ``final`` (keys ``final/*``; only for
        ``finished`` and ``early_stopped``: a diverged or failed trial has none) and terminate the
        run: FINISHED, FAILED for ``failed`` (a divergence is an expected, recorded outcome), or
        KILLED for ``interrupted`` (the sweep was stopped; the next run reopens and resumes it)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} of trial {trial_id!r} is not one of "
                             f"{', '.join(STATUSES)}")
        run_id = self._run_of(trial_id)
        if run_id in self._closed:  # recorded as done by an earlier driver: keep that record
            return
        self.flush()
        metrics = []
        if final and status in ("finished", "early_stopped"):
            last = self._last_step.setdefault(run_id, {})
            step = max([*last.values(), self._floor.get(run_id, -1), 0])
            now = int(time.time() * 1000)
            for key, value in final.items():
                if not key.startswith("final/"):
                    raise ValueError(f"final metric {key!r} of trial {trial_id!r} must be "
                                     "named final/*")
                if key not in last and math.isfinite(float(value)):
                    metrics.append(Metric(key, float(value), now, step))
                    last[key] = step
        for lo in range(0, max(len(metrics), 1), _MAX_METRICS_PER_BATCH):
            tags = [RunTag(STATUS, status), RunTag(STOP_REASON, stop_reason)]
            self.client.log_batch(run_id, metrics=metrics[lo:lo + _MAX_METRICS_PER_BATCH],
                                  tags=tags if lo == 0 else [], synchronous=True)
        self.client.set_terminated(run_id, status={"failed": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED"))

    def flush(self) -> None:
        """Write every buffered metric: one ``log_batch`` per run (per 1000 metrics)."""
        for run_id in list(self._pending):  # a failed write keeps what it did not write
            metrics = self._pending[run_id]
            while metrics:
                batch = metrics[:_MAX_METRICS_PER_BATCH]
                self.client.log_batch(run_id, metrics=batch, synchronous=True)
                del metrics[:len(batch)]
                self._n_pending -= len(batch)
            del self._pending[run_id]

    def _reattach(self, trial_id: str, run) -> None:
        """Take up ``run``, found in the store after a driver restart: the steps it holds are not
        logged again, a final record is not touched, a run closed as an orphan is reopened."""
        history = self.client.get_metric_history(run.info.run_id, _DEDUP_KEY)
        self._floor[run.info.run_id] = max((m.step for m in history), default=-1)
        # final points an earlier driver wrote without the status tag that closes the record (it
        # was killed inside finish_trial's write): finish_trial does not write them again
        self._last_step[run.info.run_id] = {k: self._floor[run.info.run_id] for k in run.data.metrics
                                            if k.startswith("final/")}
        done = run.data.tags.get(STATUS) in DONE
        if done:  # the record is final: nothing more is written to it (no second final/*)
            self._closed.add(run.info.run_id)
        elif run.info.status != "RUNNING":  # e.g. closed as an orphan: reopen
            self.client.update_run(run.info.run_id, status="RUNNING")
        self._children[trial_id] = run.info.run_id

    def _run_of(self, trial_id: str) -> str:
        """The trial's run: attached, or found in the store under this parent (a write the driver
        before a restart had queued for a trial it had attached)."""
        if trial_id in self._children:
            return self._children[trial_id]
        run = self._existing.pop(trial_id, None)
        if run is None:
            raise KeyError(f"trial {trial_id!r} has no run yet: call Tracker.trial_run first")
        self._reattach(trial_id, run)
        return run.info.run_id


_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores (dialect[+driver])
_SERVER_SCHEMES = ("http", "https", "databricks")


def check_tracking_uri(field: str, uri: str) -> str:
    """A tracking URI moue can write to from any directory: an absolute SQLite file, another SQL
    database, or a tracking server. Raises ``ConfigError`` naming ``field`` otherwise."""
    from urllib.parse import urlsplit

    from moue.errors import ConfigError

    allowed = "must be sqlite:////abs/path/mlflow.db, postgresql://..., mysql://... or http(s)://host:port"
    if not isinstance(uri, str) or not uri or any(c.isspace() for c in uri) or "://" not in uri:
        raise ConfigError(field, uri, f"is not a URI; it {allowed}")
    scheme = urlsplit(uri).scheme.lower()
    base = scheme.partition("+")[0]
    if base == "file":
        raise ConfigError(field, uri, f"is MLflow's file store, which moue does not use; it {allowed}")
    if base not in _SQL_SCHEMES and scheme not in _SERVER_SCHEMES:
        raise ConfigError(field, uri, f"has an unknown scheme {scheme!r}; it {allowed}")
    if base == "sqlite" and not uri.startswith("sqlite:////"):
        raise ConfigError(field, uri, "must be an absolute SQLite URI, sqlite:////abs/path/mlflow.db (trials "
                          "run in other directories)")
    if scheme in ("http", "https") and not urlsplit(uri).hostname:
        raise ConfigError(field, uri, f"has no host; it {allowed}")
    return uri


def probe_tracking_uri(field: str, uri: str, *, timeout: float = 5.0) -> None:
    """Fail within seconds when a tracking server does not answer (before a sweep launches: MLflow's
    own retries would block for minutes)."""
    import urllib.error
    import urllib.request

    from moue.errors import ConfigError

    if not uri.lower().startswith(("http://", "https://")):
        return
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answers (a server without /health, or behind auth): reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(field, uri, f"does not answer ({reason}); start the tracking server or fix the "
                          "address") from None


@dataclass(frozen=True)
class RecordedSweep:
    """What the store holds of a sweep: its parent run, the spec it started with, and its trials
    that are done (``DONE``), by trial id, with their status, stop reason and latest metrics."""

    parent_run_id: str
    spec_sha256: str
    spec_text: str
    done: dict[str, dict[str, Any]]


def _parent_run(client, experiment_id: str, sweep_id: str):
    """The parent run of sweep ``sweep_id`` (the first if, oddly, there are several), or None."""
    parents = search_runs(client, experiment_id,
                          f"tags.`moue.sweep_id` = {_quote('sweep_id', sweep_id)} and tags.`moue.kind` = 'study'")
    return parents[0] if parents else None


def parent_run_id(tracking_uri: str, experiment: str, sweep_id: str) -> str | None:
    """The id of sweep ``sweep_id``'s parent run, or None when the store has no such sweep."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    parent = _parent_run(client, exp.experiment_id, sweep_id) if exp is not None else None
    return parent.info.run_id if parent is not None else None


def _sweep_runs(tracking_uri: str, experiment: str, sweep_id: str):
    """``(client, parent run, trial runs)`` of sweep ``sweep_id``, or None when the store has none."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    parent = None if exp is None else _parent_run(client, exp.experiment_id, sweep_id)
    if parent is None:
        return None
    trials = search_runs(client, exp.experiment_id,
                         f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`moue.kind` = 'trial'")
    return client, parent, trials


def sweep_state(tracking_uri: str, experiment: str, sweep_id: str) -> tuple[str, dict[str, int]] | None:
    """The parent run's MLflow status and its trials counted by ``moue.status`` (``running`` for a
    trial without one), or None when the store has no such sweep."""
    found = _sweep_runs(tracking_uri, experiment, sweep_id)
    if found is None:
        return None
    _, parent, trials = found
    counts: dict[str, int] = {}
    for run in trials:
        s = run.data.tags.get(STATUS, "running")
        counts[s] = counts.get(s, 0) + 1
    return parent.info.status, counts


def recorded_sweep(tracking_uri: str, experiment: str, sweep_id: str) -> RecordedSweep | None:
    """Read a sweep's record (None when the store has no such sweep). The store, not Tune's
    periodically saved state, is the source of truth for which trials are done."""
    import tempfile

    found = _sweep_runs(tracking_uri, experiment, sweep_id)
    if found is None:
        return None
    client, parent, trials = found
    spec_text = ""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar on the console
    with tempfile.TemporaryDirectory() as d:
        try:
            spec_text = Path(client.download_artifacts(parent.info.run_id, "spec.toml", d)).read_text()
        except Exception:  # an older record without the artifact: compare hashes only
            pass
    done = {}
    for run in trials:
        tags = run.data.tags
        if tags.get(STATUS) in DONE:
            done.setdefault(tags.get(TRIAL_ID, ""), {
                "status": tags[STATUS], "stop_reason": tags.get(STOP_REASON, ""),
                "metrics": dict(run.data.metrics)})
    return RecordedSweep(parent_run_id=parent.info.run_id, spec_sha256=parent.data.tags.get("moue.spec_sha256", ""),
                         spec_text=spec_text, done=done)


# ---- provenance


def environment_info() -> dict[str, Any]:
    """Python, platform, CPU count and package versions (read from installed metadata, nothing
    imported), and GPU names, driver and CUDA version when ``nvidia-smi`` exists (else empty)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": versions,
        "gpus": [],
        "gpu_driver": "",
        "cuda": "",
    }
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return info
    try:
        query = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20, check=True).stdout
        rows = [[c.strip() for c in line.split(",")] for line in query.splitlines() if line.strip()]
        info["gpus"] = [row[0] for row in rows]
        info["gpu_driver"] = rows[0][1] if rows and len(rows[0]) > 1 else ""
        banner = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
        found = re.search(r"CUDA Version:\s*([\d.]+)", banner)
        info["cuda"] = found.group(1) if found else ""
    except (OSError, subprocess.SubprocessError) as err:
        info["gpu_error"] = f"nvidia-smi failed: {err}"
    return info


def git_info(path: str | os.PathLike[str] = ".") -> dict[str, str]:
    """``moue.git_sha`` and ``moue.git_dirty`` (tracked files changed: "true"/"false") of the
    repository holding ``path``; both "unknown" outside a repository or without ``git``."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"moue.git_sha": "unknown", "moue.git_dirty": "unknown"}
    return {"moue.git_sha": sha, "moue.git_dirty": "true" if dirty else "false"}


def log_study_summary(tracking_uri: str, parent_run_id: str, *, statuses: Mapping[str, int], fits: Mapping,
                      headline: str | None, skipped: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The study's summary on its parent run, where a user browsing MLflow looks first: trial
    counts by status and the best trial (metrics ``study/*``, tags ``moue.best_trial*``), and each
    law's verdict (tag ``moue.fit.<law>``: ``identified``, ``not identified: reasons``, or ``not
    fitted: why`` for a law in ``skipped``). An identified law's estimates, 95% intervals and
    hold-out MAPE are metrics ``fit/<law>/*``; an unidentified law's are not (they are no result).
    Returns the best trial (run name, id, loss, family), ``None`` when no trial finished."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    now = int(time.time() * 1000)
    metrics = [Metric(f"study/trials_{s}", float(statuses.get(s, 0)), now, 0) for s in STATUSES]
    tags = [RunTag("moue.headline_law", headline or "none identified")]
    best = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{STATUS}` = 'finished'",
                              order_by=[f"metrics.`{FINAL_VAL_LOSS}` ASC"], max_results=1)
    out = None
    if best and FINAL_VAL_LOSS in best[0].data.metrics:
        b = best[0]
        out = {"run_name": b.info.run_name, "run_id": b.info.run_id, "val_loss": b.data.metrics[FINAL_VAL_LOSS],
               "family": b.data.params.get("family", "")}
        metrics.append(Metric("study/best_val_loss", out["val_loss"], now, 0))
        tags += [RunTag("moue.best_trial", out["run_name"] or ""), RunTag("moue.best_trial_run_id", out["run_id"])]
    for name, r in fits.items():
        v = r.verdict
        tags.append(RunTag(f"moue.fit.{name}", "identified" if v.identified
                           else ("not identified: " + "; ".join(v.reasons))[:5000]))
        if not v.identified:
            continue
        for k, value in r.params.items():
            metrics.append(Metric(f"fit/{name}/{k}", float(value), now, 0))
            if k in r.ci:
                metrics += [Metric(f"fit/{name}/{k}_ci_lo", float(r.ci[k][0]), now, 0),
                            Metric(f"fit/{name}/{k}_ci_hi", float(r.ci[k][1]), now, 0)]
        if r.holdout is not None and math.isfinite(r.holdout.mape):
            metrics.append(Metric(f"fit/{name}/holdout_mape", float(r.holdout.mape), now, 0))
    tags += [RunTag(f"moue.fit.{name}", f"not fitted: {why}"[:5000]) for name, why in (skipped or {}).items()]
    client.log_batch(parent_run_id, metrics=metrics, tags=tags, synchronous=True)
    return out


def server_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an MLflow server moue starts: MLflow's job execution (a job runner and
    two huey consumers, for GenAI jobs moue never submits) off unless the user set
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``; the server then answers in 8 s rather than 11 with 7
    processes rather than 15 (2-core Xeon, MLflow 3.17)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


@contextlib.contextmanager
def loopback_server(folder: str | os.PathLike[str], *, db: str | os.PathLike[str] | None = None,
                    wait_s: float = 120.0) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1 (a free port, one worker) over the SQLite file ``db``
    (default ``folder/server.db``), artifacts in ``folder/server-artifacts``; yields its URL once
    ``/health`` answers and stops it (its process group) on leaving. For benchmarks and tests:
    a team's server is its own."""
    import signal
    import socket
    import urllib.request

    folder = Path(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = folder / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{Path(db or folder / 'server.db')}",
                             "--artifacts-destination", str(folder / "server-artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"the mlflow server did not start (exit {proc.poll()}): "
                                   + log_path.read_text()[-2000:])
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def log_design(tracking_uri: str, parent_run_id: str, record: Mapping[str, Any]) -> None:
    """An adaptive study's design record (``moue.studies.adaptive.design_record``) on its parent run:
    the tags ``moue.design.stop`` (why it stopped) and ``moue.design.verdict``, one step per look of
    the ``design/*`` curves (the target's estimate and interval, the compute and trials so far), and
    the whole record as ``design.json``. Idempotent: a resumed sweep logs the same steps again."""
    from moue.tracking_contract import DESIGN_ARTIFACT, DESIGN_METRICS, DESIGN_TAG, DESIGN_VERDICT_TAG

    client = MlflowClient(tracking_uri)
    client.log_text(parent_run_id, json.dumps(record, indent=1, allow_nan=True), DESIGN_ARTIFACT)  # before the tags
    start = client.get_run(parent_run_id).info.start_time or 0  # a fixed timestamp per look: logged again, the same
    metrics = []
    for look in record.get("looks", ()):
        when = start + int(look["round"])
        metrics += [Metric(name, float(look[key]), when, int(look["round"])) for key, name in DESIGN_METRICS.items()
                    if look.get(key) is not None and math.isfinite(float(look[key]))]
    tags = [RunTag(DESIGN_TAG, record.get("stop") or "not stopped: the sweep ended first"),
            RunTag(DESIGN_VERDICT_TAG, str(record.get("verdict", "undecided")))]
    for first in range(0, max(1, len(metrics)), 900):  # MLflow's batch limit is 1,000 entries
        client.log_batch(parent_run_id, metrics=metrics[first:first + 900], tags=tags if first == 0 else [],
                         synchronous=True)
