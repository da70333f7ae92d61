"""What runs on the driver during a sweep: the MLflow writer and the progress line, as Tune callbacks.

``MlflowCallback`` is the only writer to MLflow (``studies.tracking``): one parent run per sweep,
one child per trial, batched logging, final status tags, a write queue that survives a tracking
server outage; picklable, so ``Tuner.restore`` brings it back and it re-attaches to the same
runs. ``ProgressCallback`` replaces Ray's tables with one live line of state.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ray import tune

from moue_core.tracking_contract import VAL_LOSS, is_tracked
from studies.spec import Study
from studies.trainable import TIME_ATTR
from studies.plan import trial_params

__all__ = ["MlflowCallback", "ProgressCallback", "trial_params"]


def point_key(point: Mapping) -> str:
    """A point's key in ``ProgressCallback``'s ``token_cost`` (its settings as sorted JSON)."""
    return json.dumps(dict(point), sort_keys=True, default=str)


INTERRUPTED_REASON = "the sweep was interrupted before this trial ended; the next moue run resumes it"

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
        self._ended: set[str] = set()  # trials that completed or failed (kept across a restore)
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

    def __setstate__(self, state: dict) -> None:  # a sweep saved before _ended: none seen
        self.__dict__.update({"_ended": set(), **state})

    @property
    def tracker(self):
        if self._tracker is None:
            from studies.tracking import Tracker, environment_info

            tracker = Tracker(tracking_uri=self.tracking_uri, experiment=self.study.experiment,
                              description=self.study.description)
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
        plan = self.study.plan(trial.config)
        self._submit("trial_run", trial.trial_id, params=dict(plan.params), tags=dict(plan.tags),
                     run_name=plan.run_name)
        self._attached.add(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._attach(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._attach(trial)
        metrics = {k: v for k, v in result.items() if is_tracked(k)}
        if result.get("status") == "diverged":
            metrics.pop(VAL_LOSS, None)  # the searchers' inf, not a measured loss
        if metrics:
            self._submit("log_metrics", trial.trial_id, metrics, step=int(result[TIME_ATTR]))
            # one batched write per report: a driver crash then loses nothing the trial's checkpoint
            # will not replay (reports come only at marks, a handful per trial)
            self._submit("flush")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._attach(trial)
        self._ended.add(trial.trial_id)
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
        self._ended.add(trial.trial_id)
        reason = "trial failed"
        if getattr(trial, "error_file", None) and os.path.exists(trial.error_file):
            lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
            reason = lines[-1][:500] if lines else reason
        self._submit("finish_trial", trial.trial_id, status="failed", stop_reason=reason)

    def on_experiment_end(self, trials, **info) -> None:
        """The sweep ended. Trials this driver ran that did not complete (the sweep was interrupted,
        e.g. by Ctrl-C: Tune marks the trials it stops TERMINATED, so completion is what this
        callback saw) are ``interrupted`` (MLflow status KILLED); with those or with trials never
        started the parent is KILLED, not FINISHED, and the next ``moue run`` resumes them. Trials
        a restored sweep had finished before this driver are not touched."""
        stopped = [t for t in trials if t.trial_id in self._attached and t.trial_id not in self._ended]
        pending = any(t.status == "PENDING" for t in trials)
        for trial in stopped:
            self._submit("finish_trial", trial.trial_id, status="interrupted", stop_reason=INTERRUPTED_REASON)
        self._queue.append(("finish_parent", ("KILLED" if stopped or pending else "FINISHED",), {}))
        self._drain(wait=True)


class ProgressCallback(tune.Callback):
    """One live line: finished / running / early-stopped / diverged / failed, best val loss, times."""

    def __init__(self, *, total: int, concurrency: int, stream=None, total_tokens: int = 0,
                 default_budget: int = 0, token_cost: Mapping[str, float] | None = None) -> None:
        self.total, self.concurrency = total, max(1, concurrency)
        self.stream = stream
        self.t0 = time.time()
        self.last_print = 0.0
        self.trial_best: dict[str, float] = {}
        self.states: dict[str, str] = {}
        # the time left is estimated from the work done: tokens trained, each weighted by its
        # trial's cost per token (``token_cost``, by ``point_key``: studies.estimate's c0 + f / R,
        # so a token of a large model counts for more; 1 without it), with the unused budget of a
        # stopped trial taken out of the plan
        self.token_cost = dict(token_cost or {})
        self.planned = total_tokens if not self.token_cost else sum(self.token_cost.values())
        self.default_budget = default_budget
        self.seen: dict[str, int] = {}
        self.costs: dict[str, float] = {}  # trial id -> cost per token (relative)
        self.trained0 = 0.0  # tokens already trained when this driver started (a resumed sweep)

    def setup(self, **info) -> None:
        """Called when the sweep starts, also after ``--resume`` restored this callback: the rate
        is measured from now, over the tokens trained from now."""
        self.t0 = time.time()
        self.trained0 = self._work_done()

    def _cost(self, trial_id: str) -> float:
        return self.costs.get(trial_id, 1.0)

    def _work_done(self) -> float:
        return sum(t * self._cost(i) for i, t in self.seen.items())

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["stream"] = None  # streams do not pickle; a restored sweep prints to stderr
        return state

    def __setstate__(self, state: dict) -> None:  # a sweep saved before token costs: tokens alone
        self.__dict__.update({"token_cost": {}, "costs": {}, **state})

    def _line(self) -> str:
        counts = {s: sum(1 for v in self.states.values() if v == s)
                  for s in ("running", "finished", "early_stopped", "diverged", "failed")}
        done = counts["finished"] + counts["early_stopped"] + counts["diverged"] + counts["failed"]
        elapsed = time.time() - self.t0
        eta = "?"
        trained = self._work_done()
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

    def _budget(self, trial) -> int:
        point = (getattr(trial, "config", None) or {}).get("point") or {}
        return int(point.get("train.tokens", self.default_budget))

    def _unplan(self, trial) -> None:
        """A trial that ends before its budget will not train the rest of it."""
        if self.planned:
            left = max(0, self._budget(trial) - self.seen.get(trial.trial_id, 0))
            self.planned -= left * self._cost(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._note_cost(trial)
        self.states[trial.trial_id] = "running"
        self._emit()

    def _note_cost(self, trial) -> None:
        """The trial's cost per token, from its point (``token_cost`` holds budget x cost per point)."""
        if trial.trial_id in self.costs or not self.token_cost:
            return
        point = (getattr(trial, "config", None) or {}).get("point") or {}
        work = self.token_cost.get(point_key(point))
        budget = self._budget(trial)
        if work is not None and budget:
            self.costs[trial.trial_id] = work / budget

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._note_cost(trial)
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
