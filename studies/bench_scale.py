"""``moue bench scale``: how the platform's own costs grow with the number of trials (issue 14).

Three measurements, each against the real thing, none of it trained:

- **driver**: the sweep driver's callbacks (``MlflowCallback``, ``ProgressCallback``: what Tune calls
  on the driver for every report) for ``driver_trials`` trials running at once, each reporting at
  its marks, against a real SQLite store and against an ``mlflow server`` on loopback. The cost per
  result is the callbacks' whole time (trial starts, reports, ends, the parent run) over the
  results; the trials are the study's plans, the reports carry a real trial's metric keys.
- **analysis**: an experiment of 1,000 and of 10,000 trial runs, logged by moue's own ``Tracker``
  into a real SQLite store (``load_runs`` reads what a sweep wrote), then ``moue.load_runs`` (the
  best of two reads; ``load_first_s_*`` is the first, which may come from disk) and the study's
  law fit (``chinchilla``, the full start grid, a 1,000-resample bootstrap).
- **planning**: ``load_study`` of a grid of 10,000 points (every point resolved, constrained,
  counted and planned), and of 1,000.

The runs come from a ladder study (``scale_spec``): three families at ``SIZES`` widths and
``BUDGETS`` token budgets, and as many seeds as the count needs; a run's final loss follows a
Chinchilla law in its active parameters and tokens with 1% noise, so the fit has a real optimum.
Growth is the cost per trial at 10k over that at 1k (flat: 1).
"""

from __future__ import annotations

import io
import json as _json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

__all__ = ["SIZES", "BUDGETS", "scale_spec", "run_scale_bench"]

SIZES = (32, 48, 64, 80, 96)  # d_model of the ladder
BUDGETS = (65_536, 131_072, 262_144, 524_288)  # tokens per trial
FAMILIES = ("layerwise", "unipool", "moue")
LAW = {"E": 1.7, "A": 40.0, "alpha": 0.34, "B": 25.0, "beta": 0.28}  # the synthetic losses' law (loss 3.4-4.2)


def scale_spec(n_points: int, marks: int = 4) -> str:
    """A ladder study whose grid has at least ``n_points`` points (families x sizes x budgets x seeds)."""
    per_seed = len(FAMILIES) * len(SIZES) * len(BUDGETS)
    seeds = list(range(math.ceil(n_points / per_seed)))
    return f"""name = "scale"
description = "moue bench scale: {len(seeds) * per_seed} points"

[search]
space = "ladder"
algorithm = "grid"
seeds = {seeds}

[budget]
tokens = {list(BUDGETS)}
marks = {marks}

[resources]
cpus = 1

[analysis]
laws = ["chinchilla"]

[space]
families = {list(FAMILIES)}
dial = "d_model"
sizes = {list(SIZES)}
tokens_per_param = 0
active_tol = 0.05

[fixed.model]
d_model = 64
n_layers = 2
n_heads = 4
max_seq_len = 64
top_k = 2
expert_hidden = 64
router_state_dim = 16

[fixed.train]
seq_len = 64
batch_tokens = 4096
lr = 3e-3

[fixed.data]
val_tokens = 16_384
"""


def _study(n_points: int, folder: Path, marks: int = 4):
    from moue.studies.spec import load_study

    path = folder / f"scale_{n_points}.toml"
    path.write_text(scale_spec(n_points, marks))
    return load_study(path)


def _loss(plan, rng) -> float:
    n, d = plan.counts.n_params_active, plan.tokens
    clean = LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]
    return clean * math.exp(0.01 * rng.standard_normal())


def _report(plan, tokens: int, loss: float) -> dict:
    """What a trial reports at a mark (the tracked keys of a real trial, two MoE layers)."""
    out = {"tokens": tokens, "train/loss": loss * 1.02, "val/loss": loss, "lr": 1e-3, "grad_norm": 0.5,
           "tokens_per_s": 5e4, "balance/loss": 1.01, "balance/load_cv": 0.1, "balance/dead_frac": 0.0,
           "balance/maxvio": 0.2, "balance/dropped_frac": 0.0, "router/entropy": 1.3, "router/z": 2.0,
           "training_iteration": 1, "node": "127.0.0.1"}
    for layer in range(plan.config.model.n_layers):
        out[f"balance/maxvio/layer_{layer}"] = 0.2
        out[f"balance/load_entropy/layer_{layer}"] = 1.3
    return out


def _final(plan, loss: float) -> dict:
    return {"status": "finished", "final/val_loss": loss, "final/tokens": plan.tokens,
            "final/flops": plan.compute, "final/train_loss": loss * 1.02}


# ---- the driver


def _driver_ms(study, uri: str, trials: int) -> dict:
    """The driver callbacks' time per result for ``trials`` simulated trials at once: the time
    Tune's loop spends in every hook after the sweep's set-up (trial starts, reports, ends) over
    the results, and the MLflow writer's time per result (``write_ms_per_result``: its writes run
    beside Tune's loop, and this is what they cost; 1000 / it is the results per second it
    sustains). The sweep's end waits until everything is written (``drain_s``: the simulated
    trials report back to back, so the writer is behind)."""
    import numpy as np

    from moue.studies.callbacks import MlflowCallback, ProgressCallback

    rng = np.random.default_rng(0)
    points, plans = study.points[:trials], study.plans[:trials]
    callbacks = [MlflowCallback(study=study, tracking_uri=uri, sweep_id="scale", parent_tags={}),
                 ProgressCallback(total=trials, concurrency=trials, stream=io.StringIO(),
                                  total_tokens=sum(p.tokens for p in plans), default_budget=study.budget_tokens,
                                  study=study)]
    fake = [SimpleNamespace(trial_id=f"scale_{i:05d}", config={"point": pt}, last_result={}, status="RUNNING",
                            error_file=None) for i, pt in enumerate(points)]
    losses = [_loss(p, rng) for p in plans]
    spent = {"start": 0.0, "result": 0.0, "end": 0.0}

    def call(phase: str, hook: str, *args) -> None:
        t0 = time.perf_counter()
        for cb in callbacks:
            getattr(cb, hook)(*args)
        spent[phase] += time.perf_counter() - t0

    t0 = time.perf_counter()
    callbacks[0].setup()  # the sweep's start: the store's experiment and parent run, once per sweep
    callbacks[1].setup()
    setup_s = time.perf_counter() - t0
    for t in fake:
        call("start", "on_trial_start", 0, fake, t)
    n_results = 0
    for mark in range(1, study.marks + 1):  # every running trial reports at each of its marks
        for t, plan, loss in zip(fake, plans, losses, strict=True):
            result = _report(plan, plan.tokens * mark // study.marks, loss * (1 + 0.1 * (study.marks - mark)))
            t.last_result = result
            call("result", "on_trial_result", 0, fake, t, result)
            n_results += 1
    for t, plan, loss in zip(fake, plans, losses, strict=True):
        t.last_result, t.status = {**t.last_result, **_final(plan, loss)}, "TERMINATED"
        call("end", "on_trial_complete", 0, fake, t)
    t0 = time.perf_counter()
    for cb in callbacks:  # the sweep's end: waits until the writer has written everything
        cb.on_experiment_end(fake)
    drain_s = time.perf_counter() - t0
    total = sum(spent.values())
    _check_written(uri, study.experiment, trials, n_results)
    return {"ms_per_result": 1e3 * total / n_results, "ms_per_report": 1e3 * spent["result"] / n_results,
            "write_ms_per_result": 1e3 * callbacks[0].write_s / n_results, "drain_s": drain_s,
            "results": n_results, "trials": trials, "total_s": total, "setup_s": setup_s}


def _check_written(uri: str, experiment: str, trials: int, results: int) -> None:
    """The store holds what the callbacks were given (a fast driver that wrote nothing is no result)."""
    from mlflow import MlflowClient

    from moue.tracking_contract import search_runs

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = search_runs(client, exp.experiment_id, "tags.`moue.kind` = 'trial' and attributes.status = 'FINISHED'")
    some = runs[:4]
    marks = sum(len(client.get_metric_history(r.info.run_id, "val/loss")) for r in some)
    if len(runs) != trials or marks != len(some) * results // trials:
        raise RuntimeError(f"the store holds {len(runs)} finished trial runs of {trials} (and {marks} val/loss "
                           f"points in {len(some)} of them, of {len(some) * results // trials})")


# ---- the analysis


def _log_experiment(study, uri: str, n: int) -> float:
    """``n`` finished trial runs of ``study`` under one parent, written by moue's ``Tracker`` (a
    trial's marks buffered and written with its end: the record a sweep leaves, in 5 writes per
    trial instead of the driver's 8); seconds taken."""
    import numpy as np

    from moue.studies.tracking import Tracker
    from moue.tracking_contract import is_tracked

    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    tracker = Tracker(tracking_uri=uri, experiment=f"scale_{n}", description=study.description,
                      flush_every=1_000_000)
    tracker.start_parent(sweep_id=f"scale_{n}", study=study.name, spec_text=study.source, spec_sha256=study.sha256,
                         tags={}, environment={})
    for i, plan in enumerate(study.plans[:n]):
        tid = f"scale_{i:05d}"
        tracker.trial_run(tid, params=dict(plan.params), tags=dict(plan.tags), run_name=plan.run_name)
        loss = _loss(plan, rng)
        for mark in range(1, study.marks + 1):
            rep = _report(plan, plan.tokens * mark // study.marks, loss * (1 + 0.1 * (study.marks - mark)))
            tracker.log_metrics(tid, {k: v for k, v in rep.items() if is_tracked(k)}, step=rep["tokens"])
        tracker.finish_trial(tid, status="finished",
                             final={k: v for k, v in _final(plan, loss).items() if k.startswith("final/")})
    tracker.finish_parent("FINISHED")
    return time.perf_counter() - t0


BENCH_VERSION = 2  # of the logged experiments: a change to what _log_experiment writes bumps it (2: tracked keys only)


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moue" / "bench-scale"


def _logged_store(n: int, folder: Path, cache: Path | None) -> tuple[str, float | None]:
    """The SQLite URI of an experiment of ``n`` logged trials and the seconds logging took
    (``None``: reused from ``cache``, where an earlier run of the same spec, law, schema and MLflow
    version left it; written to a temporary name and renamed, so a killed run leaves none)."""
    import hashlib

    import mlflow

    from moue.tracking_contract import SCHEMA_VERSION

    study = _study(n, folder)  # every (N, D) cell at each count
    if cache is None:
        db = folder / f"runs_{n}.db"
        return f"sqlite:///{db}", _log_experiment(study, f"sqlite:///{db}", n)
    made_of = f"{scale_spec(n)}|{sorted(LAW.items())}|{SCHEMA_VERSION}|{mlflow.__version__}|{BENCH_VERSION}"
    key = hashlib.sha256(made_of.encode()).hexdigest()
    db = cache / f"runs_{n}_{key[:16]}.db"
    if db.is_file():
        return f"sqlite:///{db}", None
    cache.mkdir(parents=True, exist_ok=True)
    part = cache / f".{db.name}.{os.getpid()}.part"
    part.unlink(missing_ok=True)
    took = _log_experiment(study, f"sqlite:///{part}", n)
    os.replace(part, db)
    return f"sqlite:///{db}", took


def _load_and_fit(uri: str, n: int, n_bootstrap: int) -> dict:
    import moue

    times = []
    for _ in range(2):  # the first read may come from disk (a 10,000-run store is 440 MB): the best of two
        t0 = time.perf_counter()
        runs = moue.load_runs(f"scale_{n}", tracking_uri=uri)
        times.append(time.perf_counter() - t0)
    load_s = min(times)
    if runs.frame.height != n:
        raise RuntimeError(f"loaded {runs.frame.height} of the {n} runs logged")
    t0 = time.perf_counter()
    res = moue.fit(runs.frame, law="chinchilla", n_bootstrap=n_bootstrap)
    fit_s = time.perf_counter() - t0
    return {"load_s": load_s, "load_first_s": times[0], "fit_s": fit_s, "alpha": float(res.params["alpha"]), "beta": float(res.params["beta"]),
            "identified": bool(res.verdict.identified)}


def _plan_s(n: int, folder: Path) -> float:
    t0 = time.perf_counter()
    study = _study(n, folder)
    took = time.perf_counter() - t0
    if len(study.points) < n:
        raise RuntimeError(f"the scale grid has {len(study.points)} points, not {n}")
    return took


def run_scale_bench(*, counts: tuple[int, int] = (1000, 10_000), driver_trials: int = 64, n_bootstrap: int = 1000,
                    json: bool = False, server: bool = True, cache: Path | None | str = "default",
                    stream: TextIO = sys.stdout) -> dict:
    """Run the three measurements; print them (or one JSON object) to ``stream``. ``cache``: where
    the logged experiments are kept between runs (``"default"``: ``~/.cache/moue/bench-scale``;
    ``None``: logged afresh into the run's temporary folder)."""
    from moue.studies.tracking import loopback_server

    small, large = counts
    if cache == "default":
        cache = _cache_root()
    with tempfile.TemporaryDirectory(prefix="moue-bench-scale-") as tmp:
        folder = Path(tmp)
        plan_small, plan_large = _plan_s(small, folder), _plan_s(large, folder)
        study = _study(driver_trials, folder)
        drv = {"sqlite": _driver_ms(study, f"sqlite:///{folder / 'driver.db'}", driver_trials)}
        if server:
            with loopback_server(folder) as url:
                drv["server"] = _driver_ms(study, url, driver_trials)
        out: dict = {"trials": {"small": small, "large": large}, "driver_trials": driver_trials,
                     "driver_results": drv["sqlite"]["results"], "plan_s_1k": plan_small, "plan_s_10k": plan_large}
        for kind in ("sqlite", "server"):
            got = drv.get(kind)
            out[f"driver_ms_per_result_{kind}"] = None if got is None else got["ms_per_result"]
            out[f"driver_ms_per_report_{kind}"] = None if got is None else got["ms_per_report"]
            out[f"driver_setup_s_{kind}"] = None if got is None else got["setup_s"]
            out[f"driver_write_ms_per_result_{kind}"] = None if got is None else got["write_ms_per_result"]
        for n, tag in ((small, "1k"), (large, "10k")):
            uri, out[f"log_s_{tag}"] = _logged_store(n, folder, None if cache is None else Path(cache))
            lf = _load_and_fit(uri, n, n_bootstrap)
            out[f"load_s_{tag}"], out[f"fit_s_{tag}"] = lf["load_s"], lf["fit_s"]
            out[f"load_first_s_{tag}"] = lf["load_first_s"]
            out[f"fit_{tag}"] = {k: lf[k] for k in ("alpha", "beta", "identified")}
    ratio = large / small
    grows = [k for k in ("plan", "log", "load", "fit") if out.get(f"{k}_s_1k") and out.get(f"{k}_s_10k")]
    out["growth"] = {k: out[f"{k}_s_10k"] / out[f"{k}_s_1k"] / ratio for k in grows}
    out["per_trial_ms"] = {f"{k}_{tag}": 1e3 * out[f"{k}_s_{tag}"] / n for k in grows
                           for n, tag in ((small, "1k"), (large, "10k"))}
    if json:
        print(_json.dumps(out), file=stream)
        return out
    print("\n".join(_lines(out)), file=stream)
    return out


def _lines(out: dict) -> list[str]:
    small, large = out["trials"]["small"], out["trials"]["large"]
    drv = f"driver, {out['driver_trials']} trials at once, {out['driver_results']} results:"
    for kind, what in (("sqlite", "a SQLite store"), ("server", "a loopback mlflow server")):
        if out[f"driver_ms_per_result_{kind}"] is not None:
            drv += (f" {out[f'driver_ms_per_result_{kind}']:.1f} ms per result on {what} (the reports alone "
                    f"{out[f'driver_ms_per_report_{kind}']:.1f} ms; its writes {out[f'driver_write_ms_per_result_{kind}']:.1f} "
                    f"ms a result beside Tune's loop, {1e3 / out[f'driver_write_ms_per_result_{kind}']:.0f} results/s);")
    lines = [drv.rstrip(";") + " (goal < 20 ms per result)"]
    p = out["per_trial_ms"]
    for k, what in (("plan", "planning (load_study)"), ("log", "logging (Tracker, SQLite)"),
                    ("load", "loading (moue.load_runs)"), ("fit", "fitting (chinchilla, bootstrap)")):
        if k not in out["growth"]:
            lines.append(f"{what}: reused from the cache (--fresh logs it again)")
            continue
        lines.append(f"{what}: {out[f'{k}_s_1k']:.2f} s for {small:,} trials, {out[f'{k}_s_10k']:.2f} s for "
                     f"{large:,}; per trial {p[f'{k}_1k']:.2f} -> {p[f'{k}_10k']:.2f} ms "
                     f"(growth {out['growth'][k]:.2f}x; flat = 1, goal <= 2)")
    return lines
