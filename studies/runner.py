"""The sweep runner: a study on Ray Tune (Optuna search, ASHA), every trial logged to MLflow.

One adapter per framework and no wrapper hierarchy (STYLE.md):

- ``trial_fn`` runs in a Ray worker: Tune's flat config -> ``TrialConfig`` -> ``moue_core.train``,
  with a sink that turns each report into ``tune.report`` (+ a checkpoint) and resumes from
  ``tune.get_checkpoint()`` after a worker failure or a driver restart.
- ``MlflowCallback`` runs on the driver and is the only writer to MLflow (``studies.tracking``):
  one parent run per sweep, one child per trial, batched logging, final status tags; picklable, so
  ``Tuner.restore`` brings it back and it re-attaches to the same runs.
- ``ProgressCallback`` replaces Ray's tables with one live line of state.

Workspace layout (ARCHITECTURE.md): ``mlflow.db``, ``artifacts/``, ``ray/`` (Tune storage),
``reports/``, ``cache/`` (tokenised corpora).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from moue_core.errors import ConfigError
from moue_core.tracking_contract import TRACKED
from studies.cluster import check_state_trust, ray_init
from studies.locking import hold
from studies.spec import Study

__all__ = ["Workspace", "SweepOutcome", "run_sweep", "dry_run", "trial_fn", "MlflowCallback"]

METRIC = "val_loss"  # what ASHA and the searchers optimise (a copy of TRACKING.md's val/loss)
TIME_ATTR = "tokens"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> Workspace:
        return cls(Path(path).expanduser().resolve())

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def create(self) -> None:
        for d in (self.root, self.ray, self.cache, self.reports, self.root / "artifacts"):
            d.mkdir(parents=True, exist_ok=True)


def sweep_name(study: Study) -> str:
    return f"{study.name}-smoke" if study.smoke else study.name


def resolve_trial(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config of one trial -> the trial's full flat settings (fixed + point + budget)."""
    point = dict(config.get("point", {}))
    # Optuna's own search coordinates (``space.*``) are not settings: the space's define returned
    # the point they map to
    point.update({k: v for k, v in config.items() if k != "point" and not k.startswith("space.")})
    if study.search.algorithm != "grid":
        seed = study.search.seeds[0]
        point.setdefault("train.seed", seed)
        point.setdefault("data.seed", seed)
    flat = study.trial_flat(point)
    flat.setdefault("train.threads", max(1, int(study.resources.cpus)))
    if 0 < study.resources.gpu < 1:  # a fractional GPU share is also a memory cap
        flat.setdefault("train.gpu_memory_fraction", study.resources.gpu)
    return flat


# ------------------------------------------------------------------------------ in the worker


def trial_fn(config: dict[str, Any], *, study: Study, cache_dir: str, base_checkpoint: str | None = None,
             done: dict[str, dict[str, Any]] | None = None) -> None:
    """One Tune trial (runs in a Ray worker process). A trial the MLflow record already holds as
    done (``done``, read by a resumed driver) is not trained again: its recorded result is
    reported once, so Tune, the searcher and the summary see it, and the tracker writes nothing."""
    import ray

    from moue_core.train import TrialConfig, train

    recorded = (done or {}).get(tune.get_context().get_trial_id())
    if recorded is not None:
        tune.report(_replayed(recorded))
        return

    flat = resolve_trial(study, config)
    if "convert.router_init" in flat:
        flat["train.init_from"] = _converted_checkpoint(flat, base_checkpoint, cache_dir)
    cfg = TrialConfig.from_dict({k: v for k, v in flat.items() if not k.startswith("convert.")})
    state, corrupt = _load_checkpoint(tune.get_checkpoint())
    extra: dict[str, Any] = {"node_id": ray.get_runtime_context().get_node_id()}
    if state is not None:  # a retry after a worker failure, or a restored sweep
        extra["trial/restored_from"] = int(state["step"]) * cfg.train.batch_tokens
    if corrupt:  # recorded: checkpoints skipped as unreadable (the work since the one used is redone)
        extra["trial/corrupt_checkpoints"] = corrupt
    from moue_core.runtime import configure_process

    configure_process(cfg.train.threads)  # this worker process trains: allocator and threads
    train(cfg, _TuneSink(extra), cache_dir=cache_dir, resume=state)


CHECKPOINT_FILE, CHECKSUM_FILE = "state.pt", "state.sha256"


def _write_checkpoint(directory: Path, state: dict) -> None:
    """``state.pt`` written atomically, with its SHA-256 beside it (checked on every load)."""
    import hashlib

    import torch

    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, directory / CHECKPOINT_FILE)
    (directory / CHECKSUM_FILE).write_text(digest)


def _read_checkpoint(directory: Path) -> dict:
    """The state of a checkpoint folder; ``ValueError`` when missing, truncated or altered."""
    import hashlib
    import io

    import torch

    try:
        blob = (directory / CHECKPOINT_FILE).read_bytes()
    except OSError as exc:
        raise ValueError(f"incomplete checkpoint: {exc}") from None
    checksum = directory / CHECKSUM_FILE
    # a checkpoint of a sweep started before checksums has none: then torch.load is the only check
    if checksum.is_file() and hashlib.sha256(blob).hexdigest() != checksum.read_text().strip():
        raise ValueError("checksum mismatch")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _load_checkpoint(checkpoint) -> tuple[dict | None, int]:
    """The newest readable checkpoint of a trial: Tune's, else the trial's earlier ones (newest
    first), else none (start over). Returns (state or None, how many were skipped as corrupt)."""
    if checkpoint is None:
        return None, 0
    from pyarrow.fs import FileSelector, FileType

    fs = checkpoint.filesystem
    parent = os.path.dirname(checkpoint.path.rstrip("/"))
    try:
        found = [i.path for i in fs.get_file_info(FileSelector(parent, allow_not_found=True))
                 if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")]
    except OSError:
        found = []
    current = checkpoint.path.rstrip("/")
    older = sorted((p for p in found if p.rstrip("/") < current), reverse=True)
    corrupt = 0
    for path in [current, *older]:
        try:
            with tune.Checkpoint(path=path, filesystem=fs).as_directory() as d:
                return _read_checkpoint(Path(d)), corrupt
        except Exception as exc:  # unreadable: fall back to the one before
            print(f"[moue] checkpoint {path} is unusable ({exc}); trying an earlier one", file=sys.stderr)
            corrupt += 1
    return None, corrupt


def _replayed(recorded: dict[str, Any]) -> dict[str, Any]:
    """A done trial's last report, rebuilt from its MLflow record."""
    metrics = recorded["metrics"]
    out = {k: v for k, v in metrics.items() if k in TRACKED or k.startswith("final/") or k.startswith("time/")}
    out.update(status=recorded["status"], stop_reason=recorded["stop_reason"], replayed=True)
    out[TIME_ATTR] = int(metrics.get("final/tokens", 0))
    val = metrics.get("final/val_loss", metrics.get("val/loss"))
    out[METRIC] = math.inf if recorded["status"] == "diverged" or val is None else val
    if "final/train_s" in metrics:
        out["time/train_s"] = metrics["final/train_s"]
    return out


def _converted_checkpoint(flat: dict[str, Any], base_checkpoint: str | None, cache_dir: str) -> str:
    """The layerwise base widened to this trial's window (written once per window and router init)."""
    import torch

    from moue_core.config import ModelConfig
    from moue_core.convert import widen_layerwise
    from studies.trial import save_checkpoint

    if base_checkpoint is None:
        raise RuntimeError("a conversion trial needs the layerwise base checkpoint")
    blob = torch.load(base_checkpoint, map_location="cpu", weights_only=True)
    base = ModelConfig.from_dict(blob["config"])
    window, init = int(flat["model.window"]), str(flat["convert.router_init"])
    path = Path(cache_dir) / "conversion" / f"{Path(base_checkpoint).stem}-w{window}-{init}.pt"
    if not path.is_file():
        cfg, state = widen_layerwise(blob["model"], base, target_window=window, router_init=init)
        save_checkpoint(path, {"config": cfg.to_dict(), "model": state, "start_window": base.window})
    return str(path)


def train_conversion_base(study: Study, workspace: Workspace) -> str:
    """Train the conversion study's layerwise base once (on the driver) for the study's budget."""
    import dataclasses as dc

    from moue_core.train import NullSink, TrialConfig, train
    from search_spaces import layerwise_base
    from studies.trial import save_checkpoint

    point = study.points[0] if study.points else {}
    base_flat = layerwise_base({**study.fixed, **point})
    flat = {k: v for k, v in study.trial_flat(base_flat).items() if not k.startswith("convert.")}
    flat.pop("train.widen_tokens", None)
    flat.pop("train.init_from", None)
    cfg = TrialConfig.from_dict(flat)
    path = workspace.root / "conversion" / f"{sweep_name(study)}-base.pt"
    if path.is_file():
        return str(path)
    from moue_core.runtime import configure_process

    configure_process(cfg.train.threads)
    sink = NullSink()
    result = train(cfg, sink, cache_dir=workspace.cache)
    if result.status != "finished":
        raise RuntimeError(f"the layerwise base diverged: {result.stop_reason}")
    state = sink.checkpoints[-1][1]["model"]
    save_checkpoint(path, {"config": dc.asdict(cfg.model), "model": state, "val_loss": result.final_val_loss})
    return str(path)


class _TuneSink:
    """Each report becomes one ``tune.report`` (with the checkpoint as a directory), plus ``extra``
    (the node the trial runs on; where it was restored from)."""

    def __init__(self, extra: dict[str, Any]) -> None:
        self.extra = extra

    def report(self, metrics: dict[str, Any], step: int, checkpoint: dict | None = None) -> None:
        out = {**self.extra, **metrics}
        out[TIME_ATTR] = step
        if "val/loss" in metrics:
            out[METRIC] = metrics["val/loss"]
        elif metrics.get("status") == "diverged":
            out[METRIC] = math.inf  # searchers see a diverged point as the worst, not as missing
        if checkpoint is None:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory(prefix="moue-ckpt-") as d:
            _write_checkpoint(Path(d), checkpoint)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))


# ------------------------------------------------------------------------------ on the driver


def trial_params(study: Study, flat: dict[str, Any]) -> dict[str, Any]:
    """The params TRACKING.md asks for: the full resolved config (defaults included), the counting
    convention and the derived counts."""
    from moue_core.counting import count
    from moue_core.train import TrialConfig

    settings = {k: v for k, v in flat.items() if not k.startswith("convert.")}
    if "convert.router_init" in flat:
        settings["train.init_from"] = study.path  # resolved in the worker; validated like the spec
    cfg = TrialConfig.from_dict(settings)
    params = cfg.to_flat()
    if "convert.router_init" in flat:
        params["train.init_from"] = "layerwise base (converted in the trial)"
    params.update({k: v for k, v in flat.items() if k.startswith("convert.")})
    params.update(count(cfg.model, seq_len=cfg.train.seq_len).as_params())
    return params


class MlflowCallback(tune.Callback):
    """Driver-side MLflow logging; the tracker is rebuilt lazily after unpickling (``Tuner.restore``).

    Every write is queued and the queue is drained in order. When a tracking *server* does not
    answer, the queue keeps growing, the user is told once that nothing is lost, and the drain is
    retried with back-off (1 s doubling to 30 s) from later callbacks, so an outage never blocks
    Tune inside a callback; at the end of the sweep the driver waits for the server. The queue is
    part of the pickled state, so a driver restart in an outage loses nothing Tune saved either.
    """

    def __init__(self, *, study: Study, tracking_uri: str, sweep_id: str, parent_tags: dict[str, str]) -> None:
        self.study = study
        self.tracking_uri = tracking_uri
        self.sweep_id = sweep_id
        self.parent_tags = parent_tags
        self._tracker = None
        self._attached: set[str] = set()
        self._queue: list[tuple[str, tuple, dict]] = []
        self._down_since: float | None = None
        self._next_try = 0.0
        self._backoff = 1.0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tracker"] = None
        state["_attached"] = set()  # a restored driver re-attaches each trial to its run
        # a restored driver re-attaches first: the queued trial_run calls stay (idempotent)
        return state

    @property
    def tracker(self):
        if self._tracker is None:
            from studies.tracking import Tracker, environment_info

            tracker = Tracker(tracking_uri=self.tracking_uri, experiment=self.study.experiment)
            tracker.start_parent(sweep_id=self.sweep_id, study=self.study.name, spec_text=self.study.source,
                                 spec_sha256=self.study.sha256, tags=self.parent_tags, environment=environment_info())
            self._tracker = tracker
        return self._tracker

    # ---- the write queue

    def _outage(self, exc: BaseException) -> bool:
        if not self.tracking_uri.lower().startswith(("http://", "https://")):
            return False
        import requests

        return isinstance(exc, (OSError, requests.exceptions.RequestException)) or "API request to" in str(exc)

    def _submit(self, method: str, *args, **kwargs) -> None:
        self._queue.append((method, args, kwargs))
        self._drain()

    def _drain(self, *, wait: bool = False) -> None:
        """Write the queue in order; on an outage keep the rest for later (or, with ``wait``, retry
        until the server answers)."""
        while self._queue:
            if not wait and time.time() < self._next_try:
                return
            method, args, kwargs = self._queue[0]
            try:
                getattr(self.tracker, method)(*args, **kwargs)
            except Exception as exc:
                if not self._outage(exc):
                    raise
                if self._down_since is None:
                    self._down_since = time.time()
                    print(f"[moue] the tracking server {self.tracking_uri} does not answer; the driver keeps "
                          "every record and writes it when the server is back (nothing is lost)",
                          file=sys.stderr, flush=True)
                self._next_try = time.time() + self._backoff
                self._backoff = min(30.0, self._backoff * 2)
                if not wait:
                    return
                time.sleep(max(0.0, self._next_try - time.time()))
                continue
            self._queue.pop(0)
            if self._down_since is not None:
                print(f"[moue] the tracking server is back after {time.time() - self._down_since:.0f} s; "
                      "writing what was kept", file=sys.stderr, flush=True)
                self._down_since, self._backoff = None, 1.0

    # ---- Tune's hooks

    def setup(self, **info) -> None:
        self._submit("flush")  # creates or re-attaches the parent run now (or once the server answers)

    def _attach(self, trial) -> None:
        """Create or find the trial's run once per driver (params are resolved and counted once)."""
        if trial.trial_id in self._attached:
            return
        flat = resolve_trial(self.study, trial.config)
        seed = str(flat.get("train.seed", 0))
        self._submit("trial_run", trial.trial_id, params=trial_params(self.study, flat), tags={"moue.seed": seed})
        self._attached.add(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._attach(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._attach(trial)
        metrics = {k: result[k] for k in TRACKED if k in result}
        if metrics:
            self._submit("log_metrics", trial.trial_id, metrics, step=int(result[TIME_ATTR]))
            # one batched write per report: a driver crash then loses nothing the trial's checkpoint
            # will not replay (reports come only at marks, a handful per trial)
            self._submit("flush")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._attach(trial)
        last = trial.last_result or {}
        status = last.get("status")
        if status == "finished":
            final = {k: last[k] for k in last if k.startswith("final/")}
            self._submit("finish_trial", trial.trial_id, status="finished", final=final)
        elif status == "diverged":
            self._submit("finish_trial", trial.trial_id, status="diverged", stop_reason=str(last.get("stop_reason", "")))
        else:
            tokens = int(last.get(TIME_ATTR, 0))
            self._submit("finish_trial", trial.trial_id, status="early_stopped",
                         stop_reason=f"stopped by the {self.study.scheduler.kind} scheduler at {tokens} tokens",
                         final={"final/val_loss": last.get("val/loss", math.nan), "final/tokens": tokens})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._attach(trial)
        reason = "trial failed"
        if getattr(trial, "error_file", None) and os.path.exists(trial.error_file):
            lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
            reason = lines[-1][:500] if lines else reason
        self._submit("finish_trial", trial.trial_id, status="failed", stop_reason=reason)

    def on_experiment_end(self, trials, **info) -> None:
        self._queue.append(("finish_parent", ("FINISHED",), {}))
        self._drain(wait=True)


class ProgressCallback(tune.Callback):
    """One live line: finished / running / early-stopped / diverged / failed, best val loss, times."""

    def __init__(self, *, total: int, concurrency: int, stream=None, total_tokens: int = 0,
                 default_budget: int = 0) -> None:
        self.total, self.concurrency = total, max(1, concurrency)
        self.stream = stream
        self.t0 = time.time()
        self.last_print = 0.0
        self.trial_best: dict[str, float] = {}
        self.states: dict[str, str] = {}
        # the time left is estimated from tokens trained (trials differ in budget and size), with
        # the unused budget of a stopped trial taken out of the plan
        self.planned = total_tokens
        self.default_budget = default_budget
        self.seen: dict[str, int] = {}
        self.trained0 = 0  # tokens already trained when this driver started (a resumed sweep)

    def setup(self, **info) -> None:
        """Called when the sweep starts, also after ``--resume`` restored this callback: the rate
        is measured from now, over the tokens trained from now."""
        self.t0 = time.time()
        self.trained0 = sum(self.seen.values())

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["stream"] = None  # streams do not pickle; a restored sweep prints to stderr
        return state

    def _line(self) -> str:
        counts = {s: sum(1 for v in self.states.values() if v == s)
                  for s in ("running", "finished", "early_stopped", "diverged", "failed")}
        done = counts["finished"] + counts["early_stopped"] + counts["diverged"] + counts["failed"]
        elapsed = time.time() - self.t0
        eta = "?"
        trained = sum(self.seen.values())
        if self.planned and trained > self.trained0:
            eta = f"{elapsed / (trained - self.trained0) * max(0, self.planned - trained):.0f}s"
        elif done:
            eta = f"{elapsed / done * max(0, self.total - done):.0f}s"
        best = "-" if not math.isfinite(self.best) else f"{self.best:.4f}"
        return (f"[moue] {done}/{self.total} done: {counts['finished']} finished, {counts['early_stopped']} "
                f"early-stopped, {counts['diverged']} diverged, {counts['failed']} failed; "
                f"{counts['running']} running | best val {best} | {elapsed:.0f}s elapsed, ~{eta} left")

    def _emit(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last_print >= 5:
            stream = self.stream or sys.stderr
            print(self._line(), file=stream, flush=True)
            self.last_print = now

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.states[trial.trial_id] = "running"
        self._emit()

    def _budget(self, trial) -> int:
        point = (getattr(trial, "config", None) or {}).get("point") or {}
        return int(point.get("train.tokens", self.default_budget))

    def _unplan(self, trial) -> None:
        """A trial that ends before its budget will not train the rest of it."""
        if self.planned:
            self.planned -= max(0, self._budget(trial) - self.seen.get(trial.trial_id, 0))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tokens = result.get(TIME_ATTR)
        if isinstance(tokens, (int, float)):
            self.seen[trial.trial_id] = int(tokens)
        v = result.get("val/loss")
        if isinstance(v, (int, float)) and math.isfinite(v):
            self.trial_best[trial.trial_id] = min(self.trial_best.get(trial.trial_id, math.inf), v)
        if result.get("status") == "diverged":  # its earlier losses are no result
            self.trial_best.pop(trial.trial_id, None)
        self._emit()

    @property
    def best(self) -> float:
        """The best validation loss of a trial that has not diverged."""
        return min(self.trial_best.values(), default=math.inf)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        status = (trial.last_result or {}).get("status")
        self.states[trial.trial_id] = status if status in ("finished", "diverged") else "early_stopped"
        if status == "diverged":
            self.trial_best.pop(trial.trial_id, None)
        self._unplan(trial)
        self._emit(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.states[trial.trial_id] = "failed"
        self._unplan(trial)
        self._emit(force=True)


def prune_checkpoints(results) -> int:
    """After a sweep: each trial keeps only the checkpoint Tune would restore it from.

    Why not ``CheckpointConfig(num_to_keep=1)``: Tune deletes the older checkpoint as soon as a
    newer one is registered, while the experiment state that ``--resume`` reads reaches storage
    later (an asynchronous sync). A driver killed in between leaves a state pointing at a deleted
    checkpoint, and that trial can never resume ("Could not recover from checkpoint as it does
    not exist on storage anymore"; seen in CI). Pruning when a trial ends has the same window
    (the stored state may still list it as running on its previous checkpoint). So Tune keeps
    every checkpoint during the sweep (``marks`` per trial on disk) and this runs once
    ``Tuner.fit`` has returned, after Tune's final, waited-for save of the experiment state. The
    kept checkpoint is ``result.checkpoint`` (the one Tune registered), not the newest folder: a
    worker that died while writing one leaves a folder Tune never recorded. Returns the number of
    folders removed; failures are reported, never raised (housekeeping only)."""
    removed = 0
    for result in results:
        keep = result.checkpoint.path if result.checkpoint is not None else None
        if keep is None:
            continue  # nothing registered: leave the trial's folders alone
        try:
            from pyarrow.fs import FileSelector, FileType

            fs = result.filesystem
            for info in fs.get_file_info(FileSelector(result.path, allow_not_found=True)):
                if (info.type == FileType.Directory and info.base_name.startswith("checkpoint_")
                        and info.path.rstrip("/") != keep.rstrip("/")):
                    fs.delete_dir(info.path)
                    removed += 1
        except Exception as exc:
            print(f"[moue] could not prune old checkpoints in {result.path}: {exc}", file=sys.stderr)
    return removed


# ------------------------------------------------------------------------------ the sweep


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str | None
    storage: str
    trials: int
    statuses: dict[str, int]
    best_val_loss: float | None
    wall_s: float
    train_s: float  # time inside training steps, summed over trials
    concurrency: int


def _define(trial, *, space_name: str, fixed: dict, options: dict):
    from search_spaces import get_space

    return get_space(space_name).define(trial, fixed, options)


def run_sweep(
    study: Study,
    *,
    workspace: Workspace,
    resume: bool = False,
    address: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    max_failures: int = 2,
    progress_stream=None,
) -> SweepOutcome:
    """Run (or ``resume``) the study's sweep and return its outcome. One driver at a time holds
    the workspace (and a shared ``storage``); a second one exits 2 naming the holder."""
    from studies.tracking import check_tracking_uri, probe_tracking_uri

    uri = tracking_uri or study.tracking_uri or workspace.tracking_uri
    field = "--tracking-uri" if tracking_uri else "tracking.tracking_uri"
    probe_tracking_uri(field, check_tracking_uri(field, uri))
    if uri.lower().startswith(("http://", "https://")):
        # fail fast inside a callback (MLflow's default retries block for minutes); the callback
        # queues what it could not write and retries with its own back-off
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not address:
        _check_resources(study, {"CPU": float(os.cpu_count() or 1), "GPU": float(_local_gpus())}, "this machine")
    storage_root = storage or str(workspace.ray)
    name = sweep_name(study)
    exp_dir = os.path.join(storage_root, name) if "://" not in storage_root else f"{storage_root.rstrip('/')}/{name}"
    if resume and "://" not in exp_dir and not os.path.isdir(exp_dir):  # refuse before creating anything
        raise ConfigError("--resume", exp_dir, "has no sweep state to resume; run without --resume")
    with contextlib.ExitStack() as locks:
        locks.enter_context(hold(workspace.root, what="workspace"))
        if storage and "://" not in storage:
            locks.enter_context(hold(Path(storage_root), what="--storage"))
        return _run_sweep_locked(study, workspace=workspace, resume=resume, address=address, uri=uri,
                                 storage_root=storage_root, exp_dir=exp_dir, max_failures=max_failures,
                                 progress_stream=progress_stream)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_resources(study: Study, largest: dict[str, float], where: str) -> None:
    """A trial must fit on one node; otherwise Tune would wait for ever."""
    cpus, gpu = study.resources.cpus, study.resources.gpu
    if cpus > largest.get("CPU", 0):
        raise ConfigError("resources.cpus", cpus, f"must be at most {largest.get('CPU', 0):g}: the CPUs of "
                          f"{where} (a trial runs on one node)")
    if gpu > largest.get("GPU", 0):
        raise ConfigError("resources.gpu", gpu, f"must be at most {largest.get('GPU', 0):g}: the GPUs of {where}"
                          + (" (it has none)" if not largest.get("GPU") else ""))


def _largest_node(ray) -> dict[str, float]:
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "GPU")}


def _check_resumable(study: Study, recorded) -> None:
    """A resumed sweep continues the spec it started with: an edited spec is refused, naming what changed."""
    if recorded is None or recorded.spec_sha256 in ("", study.sha256):
        return
    import tomllib

    from studies.spec import flatten_toml

    try:
        before, after = flatten_toml(tomllib.loads(recorded.spec_text)), flatten_toml(tomllib.loads(study.source))
    except tomllib.TOMLDecodeError:
        before, after = {}, {"?": "?"}
    if before == after:
        return  # comments or layout only: the same study
    changed = [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
               for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    raise ConfigError(f"spec {study.path}", "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""),
                      f"changed since sweep {sweep_name(study)!r} started; --resume continues the spec it started "
                      "with: restore those values, or change `name` to start a new sweep")


def _run_sweep_locked(study: Study, *, workspace: Workspace, resume: bool, address: str | None, uri: str,
                      storage_root: str, exp_dir: str, max_failures: int, progress_stream) -> SweepOutcome:
    # Ray warns when frequent checkpoints force experiment snapshots (with num_to_keep set); harmless
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray.tune.schedulers import ASHAScheduler

    from studies.tracking import git_info, recorded_sweep

    name = sweep_name(study)
    exists = tune.Tuner.can_restore(exp_dir) if "://" in exp_dir or os.path.isdir(exp_dir) else False
    if resume and not exists:
        raise ConfigError("--resume", exp_dir, "has no sweep state to resume; run without --resume")
    if exists and not resume:
        raise ConfigError("sweep", name, f"already has state in {exp_dir}; pass --resume to continue it")
    done: dict[str, dict[str, Any]] = {}
    if resume:
        check_state_trust(exp_dir)  # Tune unpickles it
        recorded = recorded_sweep(uri, study.experiment, name)
        _check_resumable(study, recorded)
        done = recorded.done if recorded else {}
    workspace.create()

    base = None
    if study.search.space == "conversion":
        base = train_conversion_base(study, workspace)
    ray_init(address, workspace.root)
    import ray

    if address:
        _check_resources(study, _largest_node(ray), f"the largest node of the cluster at {address}")

    cpus = study.resources.cpus
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, study=study, cache_dir=str(workspace.cache), base_checkpoint=base, done=done),
        {"cpu": cpus, "gpu": study.resources.gpu},
    )
    total = len(study.points) if study.search.algorithm == "grid" else study.search.num_samples
    cluster_cpus = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    concurrency = study.search.max_concurrent or max(1, int(cluster_cpus // cpus))
    git = git_info(Path(__file__).resolve().parent.parent)
    parent_tags = {
        **git, "moue.search": study.search.algorithm, "moue.scheduler": study.scheduler.kind,
        "moue.ray_storage": exp_dir, "moue.corpus_fingerprint": _corpus_fingerprint(study, workspace),
        "moue.smoke": str(study.smoke).lower(),
    }
    callbacks = [MlflowCallback(study=study, tracking_uri=uri, sweep_id=name, parent_tags=parent_tags),
                 ProgressCallback(total=total, concurrency=concurrency, stream=progress_stream,
                                  total_tokens=(sum(study.trial_tokens(p) for p in study.points)
                                                if study.search.algorithm == "grid" else total * study.budget_tokens),
                                  default_budget=study.budget_tokens)]
    t0 = time.time()
    if resume:
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if study.scheduler.kind == "asha":
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=study.budget_tokens,
                                      grace_period=study.scheduler.grace_tokens,
                                      reduction_factor=study.scheduler.reduction_factor)
        search_alg = None
        if study.search.algorithm == "grid":
            param_space = {"point": tune.grid_search(study.points)}
            num_samples = 1
        else:
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            sampler = (optuna.samplers.RandomSampler(seed=study.search.seed) if study.search.algorithm == "random"
                       else optuna.samplers.TPESampler(seed=study.search.seed))
            define = functools.partial(_define, space_name=study.search.space, fixed=study.fixed,
                                       options=study.space_options)
            search_alg = OptunaSearch(space=define, metric=METRIC, mode="min", sampler=sampler,
                                      study_name=f"{name}-{study.sha256[:12]}")
            param_space = {}
            num_samples = study.search.num_samples
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, search_alg=search_alg,
                                        num_samples=num_samples, max_concurrent_trials=concurrency,
                                        reuse_actors=True),  # a trial starts in a warm worker (torch imported)
            run_config=tune.RunConfig(
                name=name, storage_path=storage_root, callbacks=callbacks, verbose=0,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # see prune_checkpoints
            ),
        )
    results = tuner.fit()
    prune_checkpoints(results)
    wall = time.time() - t0
    statuses: dict[str, int] = {}
    best = math.inf
    train_s = 0.0
    for trial_result in results:
        last = trial_result.metrics or {}
        train_s += float(last.get("time/train_s", 0.0))
        status = last.get("status") or ("failed" if trial_result.error else "early_stopped")
        statuses[status] = statuses.get(status, 0) + 1
        v = last.get(METRIC)
        if isinstance(v, (int, float)) and math.isfinite(v):
            best = min(best, v)
    parent = _parent_run_id(uri, study.experiment, name)
    return SweepOutcome(name=name, experiment=study.experiment, tracking_uri=uri, parent_run_id=parent,
                        storage=exp_dir, trials=len(results), statuses=statuses,
                        best_val_loss=None if not math.isfinite(best) else best, wall_s=wall, train_s=train_s,
                        concurrency=min(concurrency, total))


def _parent_run_id(uri: str, experiment: str, sweep_id: str) -> str | None:
    """Look the parent up (after a restore the callback that wrote it lives inside Tune)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1,
                              filter_string=f"tags.`moue.sweep_id` = '{sweep_id}' and tags.`moue.kind` = 'study'")
    return runs[0].info.run_id if runs else None


def _corpus_fingerprint(study: Study, workspace: Workspace) -> str:
    """Build (or reuse) the study's corpus cache on the driver once, before trials race for it."""
    from moue_core.data import DataConfig, load_corpus

    data = {k.partition(".")[2]: v for k, v in study.fixed.items() if k.startswith("data.")}
    data.pop("seed", None)
    return load_corpus(DataConfig.from_dict(data), cache_dir=workspace.cache).fingerprint


# ------------------------------------------------------------------------------ dry run


def dry_run(study: Study) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each trial's settings with its counts and compute, and the totals; launches nothing."""
    from studies.spec import preview_points

    if study.search.algorithm == "grid":
        points = study.points
    else:
        points = preview_points(study, study.search.num_samples)
    rows = []
    for i, point in enumerate(points):
        flat = resolve_trial(study, point)
        params = trial_params(study, flat)
        compute = params["derived.flops_per_token"] * flat["train.tokens"]
        rows.append({"trial": i, "point": point, "tokens": flat["train.tokens"], "active": params["derived.n_params_active"],
                     "total": params["derived.n_params_total"], "virtual_width": params["derived.virtual_width"],
                     "reuse": params["derived.reuse"], "compute": compute})
    totals = {"trials": len(rows), "compute": sum(r["compute"] for r in rows), "pruned": len(study.pruned),
              "tokens": sum(r["tokens"] for r in rows)}
    return rows, totals
