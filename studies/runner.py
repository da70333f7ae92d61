"""The sweep: a study on Ray Tune (Optuna search, ASHA), every trial logged to MLflow.

One adapter per framework and no wrapper hierarchy (STYLE.md). The seams, one module each:
``moue.studies.workspace`` (where things live, a trial's resolved settings), ``moue.studies.trainable``
(what runs in a Ray worker), ``moue.studies.callbacks`` (the driver's MLflow writer and progress line),
``moue.studies.checkpoints`` (write, verify, fall back, prune), ``moue.studies.cluster`` (the Ray cluster),
``moue.studies.locking`` (one driver per workspace). This module plans and runs the sweep.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from moue.errors import ConfigError
from moue.studies.cluster import check_state_trust, ray_init
from moue.studies.locking import hold
from moue.studies.spec import Study

from moue.studies.callbacks import MlflowCallback, ProgressCallback
from moue.studies.checkpoints import prune_checkpoints
from moue.studies.trainable import METRIC, TIME_ATTR, train_conversion_base, trial_fn
from moue.studies.plan import resolve_trial, trial_params
from moue.studies.workspace import SweepInterrupted, Workspace, sweep_name

# the names other modules (and Tune's pickled state of earlier sweeps) find here
__all__ = ["Workspace", "SweepOutcome", "SweepInterrupted", "run_sweep", "dry_run", "trial_fn", "MlflowCallback", "ProgressCallback",
           "METRIC", "TIME_ATTR", "prune_checkpoints", "resolve_trial", "sweep_name", "trial_params",
           "train_conversion_base"]


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
    design: dict | None = None  # an adaptive study's design record (moue.studies.adaptive.design_record)


def _define(trial, *, space_name: str, fixed: dict, options: dict):
    from moue.search_spaces import get_space

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
    from moue.studies.tracking import check_tracking_uri, probe_tracking_uri

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


_NOT_TRIAL_KEYS = ("lr_stage.on_unidentified", "smoke.lr_stage.on_unidentified")  # spec keys that change no trial: editable on resume


def _check_resumable(study: Study, recorded) -> None:
    """A resumed sweep continues the spec it started with: an edited spec is refused, naming what changed."""
    if recorded is None or recorded.spec_sha256 in ("", study.sha256):
        return
    import tomllib

    from moue.studies.spec import flatten_toml

    try:
        before, after = flatten_toml(tomllib.loads(recorded.spec_text)), flatten_toml(tomllib.loads(study.source))
    except tomllib.TOMLDecodeError:
        before, after = {}, {"?": "?"}
    for key in _NOT_TRIAL_KEYS:
        before.pop(key, None), after.pop(key, None)
    if not study.smoke:  # the [smoke.*] overrides change no trial of the full study
        before, after = ({k: v for k, v in d.items() if not k.startswith("smoke.")} for d in (before, after))
    if before == after:
        return  # comments or layout only (or a setting no trial depends on): the same study
    changed = [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
               for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    raise ConfigError(f"spec {study.path}", "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""),
                      f"changed since sweep {sweep_name(study)!r} started; --resume continues the spec it started "
                      "with: restore those values, or change `name` to start a new sweep")


def _run_sweep_locked(study: Study, *, workspace: Workspace, resume: bool, address: str | None, uri: str,
                      storage_root: str, exp_dir: str, max_failures: int, progress_stream) -> SweepOutcome:
    # Ray warns when frequent checkpoints force experiment snapshots (with num_to_keep set); harmless
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from moue.studies.tracking import parent_run_id

    name = sweep_name(study)
    done = _prior_state(study, resume=resume, uri=uri, exp_dir=exp_dir)
    workspace.create()
    base = train_conversion_base(study, workspace) if study.search.space == "conversion" else None
    ray_init(address, workspace.root)
    import ray

    if address:
        _check_resources(study, _largest_node(ray), f"the largest node of the cluster at {address}")
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, study=study, cache_dir=str(workspace.cache), base_checkpoint=base, done=done),
        {"cpu": study.resources.cpus, "gpu": study.resources.gpu},
    )
    total = len(study.points) if study.search.algorithm == "grid" else study.search.num_samples
    concurrency = concurrency_of(study, ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    callbacks = _callbacks(study, workspace, uri=uri, exp_dir=exp_dir, total=total, concurrency=concurrency,
                           progress_stream=progress_stream)
    t0 = time.time()
    if resume:
        from moue.studies.legacy import install

        install()  # a sweep saved before moue was one package pickled the old module names
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(study, trainable, storage_root=storage_root, callbacks=callbacks,
                           concurrency=concurrency, max_failures=max_failures,
                           record=workspace.design_record(name))
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
    # the MLflow record says whether the sweep was interrupted: the driver's callback marked the
    # trials it did not see end (and the parent) when the experiment ended (moue.studies.callbacks)
    from moue.studies.tracking import sweep_state

    state = sweep_state(uri, study.experiment, name)
    interrupted = state is not None and state[0] == "KILLED"
    if interrupted:
        statuses = dict(state[1])
    parent = parent_run_id(uri, study.experiment, name)
    design = _log_design(study, workspace, uri, parent)
    outcome = SweepOutcome(name=name, experiment=study.experiment, tracking_uri=uri, parent_run_id=parent,
                           storage=exp_dir, trials=len(results), statuses=statuses,
                           best_val_loss=None if not math.isfinite(best) else best, wall_s=wall, train_s=train_s,
                           concurrency=min(concurrency, total), design=design)
    if interrupted:
        raise SweepInterrupted(outcome, not_started=max(0, total - sum(statuses.values())))
    return outcome


def _log_design(study: Study, workspace: Workspace, uri: str, parent: str | None) -> dict | None:
    """An adaptive sweep's design record, read from the workspace and logged to its parent run."""
    import json

    path = workspace.design_record(sweep_name(study))
    if study.design is None or not path.is_file():
        return None
    record = json.loads(path.read_text())
    if parent is not None:
        from moue.studies.tracking import log_design

        log_design(uri, parent, record)
    return record


def _prior_state(study: Study, *, resume: bool, uri: str, exp_dir: str) -> dict[str, dict[str, Any]]:
    """Check that the sweep's Tune state matches ``--resume``; on resume, the trials the MLflow
    record holds as done (by trial id), after checking the state can be trusted and the spec is
    unchanged."""
    from moue.studies.tracking import recorded_sweep

    name = sweep_name(study)
    exists = tune.Tuner.can_restore(exp_dir) if "://" in exp_dir or os.path.isdir(exp_dir) else False
    if resume and not exists:
        raise ConfigError("--resume", exp_dir, "has no sweep state to resume; run without --resume")
    if exists and not resume:
        raise ConfigError("sweep", name, f"already has state in {exp_dir}; pass --resume to continue it")
    if not resume:
        return {}
    check_state_trust(exp_dir)  # Tune unpickles it
    recorded = recorded_sweep(uri, study.experiment, name)
    _check_resumable(study, recorded)
    return recorded.done if recorded else {}


def _callbacks(study: Study, workspace: Workspace, *, uri: str, exp_dir: str, total: int, concurrency: int,
               progress_stream) -> list[tune.Callback]:
    """The driver's MLflow writer (with the parent run's provenance tags) and progress line."""
    from moue.studies.tracking import git_info

    parent_tags = {
        **git_info(Path(__file__).resolve().parent.parent), "moue.search": study.search.algorithm,
        "moue.scheduler": study.scheduler.kind, "moue.ray_storage": exp_dir,
        "moue.corpus_fingerprint": _corpus_fingerprint(study, workspace), "moue.smoke": str(study.smoke).lower(),
    }
    planned = (sum(plan.tokens for plan in study.plans) if study.search.algorithm == "grid"
               else total * study.budget_tokens)
    token_cost, estimate_s = _eta_basis(study, concurrency)
    return [MlflowCallback(study=study, tracking_uri=uri, sweep_id=sweep_name(study), parent_tags=parent_tags),
            ProgressCallback(total=total, concurrency=concurrency, stream=progress_stream, total_tokens=planned,
                             default_budget=study.budget_tokens, token_cost=token_cost, study=study,
                             estimate_s=estimate_s)]


def concurrency_of(study: Study, cpus: float) -> int:
    """Trials at once on ``cpus`` CPUs: the spec's ``max_concurrent``, else as many as fit."""
    return study.search.max_concurrent or max(1, int(cpus // study.resources.cpus))


ETA_TIMING_FLOPS = 1e12  # a grid of more compute gets a cost-weighted ETA (two models timed, ~5 s)


def _eta_basis(study: Study, concurrency: int) -> tuple[dict[str, float] | None, float | None]:
    """What the progress display's time left starts from: each grid point's planned work (its
    tokens at its cost per token, ``c0 + f / R`` timed here by ``moue.studies.estimate``; evaluations
    and branches included), so a large model's tokens count for more than a small one's, and the
    dry run's estimate of the sweep's wall time. ``(None, None)`` (tokens alone, the measured rate)
    for a search, a GPU study, or a grid under ``ETA_TIMING_FLOPS`` (seconds: not worth the timing)."""
    from moue.studies.callbacks import point_key
    from moue.studies.estimate import cost_line, estimate_sweep, on_gpu, trial_tokens

    plans = study.plans if study.search.algorithm == "grid" else []
    if not plans or sum(p.compute for p in plans) < ETA_TIMING_FLOPS or on_gpu(plans):
        return None, None
    line = cost_line(plans)
    c0, rate, _ = line
    work = {point_key(point): trial_tokens(plan, study.marks) * (c0 + plan.counts.flops_per_token / rate)
            for point, plan in zip(study.points, plans, strict=True)}
    return work, estimate_sweep(plans, concurrency=concurrency, marks=study.marks, line=line).wall_s


def _new_tuner(study: Study, trainable, *, storage_root: str, callbacks: list, concurrency: int,
               max_failures: int, record: Path) -> tune.Tuner:
    """A fresh Tuner: the grid (``{"point": ...}`` per trial), the adaptive design's searcher
    (``[design]``: it hands out grid points one round at a time) or the Optuna sampler, ASHA if asked."""
    from ray.tune.schedulers import ASHAScheduler

    name = sweep_name(study)
    scheduler = None
    if study.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=study.budget_tokens,
                                  grace_period=study.scheduler.grace_tokens,
                                  reduction_factor=study.scheduler.reduction_factor)
    search_alg = None
    if study.design is not None:
        from moue.studies.adaptive import AdaptiveSearcher

        search_alg = AdaptiveSearcher(study, metric=METRIC, record=record)
        param_space, num_samples = {}, len(study.points)
    elif study.search.algorithm == "grid":
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
    return tune.Tuner(
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


def _corpus_fingerprint(study: Study, workspace: Workspace) -> str:
    """Build (or reuse) the study's corpus cache on the driver once, before trials race for it."""
    from moue.data import DataConfig, load_corpus

    data = {k.partition(".")[2]: v for k, v in study.fixed.items() if k.startswith("data.")}
    data.pop("seed", None)
    return load_corpus(DataConfig.from_dict(data), cache_dir=workspace.cache).fingerprint


# ------------------------------------------------------------------------------ dry run


def dry_run(study: Study) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each trial's settings with its counts and compute, and the totals; launches nothing."""
    from moue.studies.spec import family_of, preview_points

    if study.search.algorithm == "grid":
        points, plans = study.points, study.plans
    else:
        points = preview_points(study, study.search.num_samples)
        plans = [study.plan(point) for point in points]
    rows = []
    for i, (point, plan) in enumerate(zip(points, plans, strict=True)):
        c = plan.counts
        rows.append({"trial": i, "point": point, "family": family_of(study.fixed, point), "tokens": plan.tokens,
                     "active": c.n_params_active,
                     "total": c.n_params_total, "virtual_width": c.virtual_width, "reuse": c.reuse,
                     "compute": plan.compute, "plan": plan})
    totals = {"trials": len(rows), "compute": sum(r["compute"] for r in rows), "pruned": len(study.pruned),
              "tokens": sum(r["tokens"] for r in rows)}
    if study.design is not None:
        from moue.studies.adaptive import build_design, round_lines

        design = build_design(study)
        totals["design"] = round_lines(design, design.initial())
    return rows, totals
