"""What runs on the driver during a sweep: the MLflow writer and the progress line, as Tune callbacks.

``MlflowCallback`` is the only writer to MLflow (``moue.studies.tracking``): one parent run per sweep,
one child per trial, batched logging, final status tags, a write queue that survives a tracking
server outage; picklable, so ``Tuner.restore`` brings it back and it re-attaches to the same
runs. ``ProgressCallback`` replaces Ray's tables with its own display, redrawn in place on a terminal.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from ray import tune

from moue.tracking_contract import TRAIN_LOSS, VAL_LOSS, is_tracked
from moue.studies.estimate import human_duration
from moue.studies.spec import Study
from moue.studies.trainable import TIME_ATTR
from moue.studies.plan import trial_params

__all__ = ["MlflowCallback", "ProgressCallback", "trial_params"]


def point_key(point: Mapping) -> str:
    """A point's key in ``ProgressCallback``'s ``token_cost`` (its settings as sorted JSON)."""
    return json.dumps(dict(point), sort_keys=True, default=str)


INTERRUPTED_REASON = "the sweep was interrupted before this trial ended; the next moue run resumes it"

class MlflowCallback(tune.Callback):
    """Driver-side MLflow logging; the tracker is rebuilt lazily after unpickling (``Tuner.restore``).

    Every write is queued and a writer thread drains the queue in order, so Tune's loop never
    waits on the store (a loopback ``mlflow server`` takes 40-100 ms a request; ``moue bench
    scale``). An item leaves the queue only once written, and the queue is the state Tune saves
    with its trials' at every experiment checkpoint (``get_state``), so a restored driver writes
    what the killed one had not for every result Tune saved as seen (the writes are idempotent: a
    run is found again, a metric's step is not logged twice). When a tracking
    *server* does not answer, the writer tells the user once that nothing is lost and retries with
    back-off (1 s doubling to 30 s); at the end of the sweep the driver waits until everything is
    written. Any other error of the store stops the sweep at the next callback, as if raised there.
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
        self._backoff = 1.0
        self._init_writer()

    def _init_writer(self) -> None:
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self.write_s = 0.0  # seconds the writer spent writing (moue bench scale)

    _UNPICKLED = ("_tracker", "_cond", "_writer", "_error", "_stopping")

    def __getstate__(self) -> dict:
        with self._cond:  # the queue as it is between two writes
            state = dict(self.__dict__)
            state["_queue"] = list(self._queue)
        for key in self._UNPICKLED:
            state.pop(key, None)
        state["_tracker"] = None
        state["_attached"] = set()  # a restored driver re-attaches each trial to its run
        # a restored driver re-attaches first: the queued trial_run calls stay (idempotent)
        return state

    def __setstate__(self, state: dict) -> None:  # a sweep saved before _ended: none seen
        self.__dict__.update({"_ended": set(), **state})
        self.__dict__.pop("_next_try", None)  # a sweep saved when the callbacks wrote themselves
        self._init_writer()

    def get_state(self) -> dict:
        """What Tune saves with every experiment checkpoint, next to its trials' states: the writes
        not yet done (a restored driver does them; ``set_state``)."""
        with self._cond:
            return {"queue": list(self._queue)}

    def set_state(self, state: dict) -> None:
        with self._cond:
            self._queue[:0] = [tuple(item) for item in state.get("queue", ())]
            self._cond.notify_all()

    @property
    def tracker(self):
        if self._tracker is None:
            from moue.studies.tracking import Tracker, environment_info

            tracker = Tracker(tracking_uri=self.tracking_uri, experiment=self.study.experiment,
                              description=self.study.description)
            tracker.start_parent(sweep_id=self.sweep_id, study=self.study.name, spec_text=self.study.source,
                                 spec_sha256=self.study.sha256, tags=self.parent_tags, environment=environment_info())
            self._tracker = tracker
        return self._tracker

    # ---- the write queue and its writer

    def _outage(self, exc: BaseException) -> bool:
        if not self.tracking_uri.lower().startswith(("http://", "https://")):
            return False
        import requests

        return isinstance(exc, (OSError, requests.exceptions.RequestException)) or "API request to" in str(exc)

    def _submit(self, method: str, *args, **kwargs) -> None:
        self._raise_writer_error()
        with self._cond:
            self._queue.append((method, args, kwargs))
            self._cond.notify_all()
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="moue-mlflow-writer", daemon=True)
            self._writer.start()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_loop(self) -> None:
        """The writer: the queue's items in order, each removed once written; an outage of a
        server is waited out with back-off, any other error ends the writer (raised by the next
        callback)."""
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                method, args, kwargs = self._queue[0]
            t0 = time.perf_counter()
            try:
                getattr(self.tracker, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - handed to the driver's thread
                if not self._outage(exc):
                    with self._cond:
                        self._error = exc
                        self._cond.notify_all()
                    return
                if self._down_since is None:
                    self._down_since = time.time()
                    print(f"[moue] the tracking server {self.tracking_uri} does not answer; the driver keeps "
                          "every record and writes it when the server is back (nothing is lost)",
                          file=sys.stderr, flush=True)
                time.sleep(self._backoff)
                self._backoff = min(30.0, self._backoff * 2)
                continue
            finally:
                self.write_s += time.perf_counter() - t0
            with self._cond:
                self._queue.pop(0)
                self._cond.notify_all()
            if self._down_since is not None:
                print(f"[moue] the tracking server is back after {time.time() - self._down_since:.0f} s; "
                      "writing what was kept", file=sys.stderr, flush=True)
                self._down_since, self._backoff = None, 1.0

    def wait_written(self) -> None:
        """Block until every queued write is done (through an outage: until the server is back);
        raise the store's error if the writer stopped on one."""
        with self._cond:
            while self._queue and self._error is None and self._writer is not None and self._writer.is_alive():
                self._cond.wait(timeout=0.5)
        self._raise_writer_error()

    def _stop_writer(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join()
        self._writer, self._stopping = None, False

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
        self._submit("finish_parent", "KILLED" if stopped or pending else "FINISHED")
        try:
            self.wait_written()
        finally:
            self._stop_writer()


def _eta_text(s: float) -> str:
    """The time left: to the second under 10 minutes, then as ``moue.studies.estimate`` says it."""
    if 120 <= s < 600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return human_duration(s)


PRIOR_WEIGHT = 0.3  # the estimate counts as this fraction of its own wall time of measured progress


class ProgressCallback(tune.Callback):
    """The sweep's progress: trials by state, the best val loss, time elapsed and left, and, on a
    terminal, a table of the running trials (family, active parameters, tokens, current loss)
    redrawn in place (rich). Elsewhere (a log file, a pipe) one line every 5 s.

    The time left follows the work done: tokens trained, each weighted by its trial's cost per
    token (``token_cost``, by ``point_key``: moue.studies.estimate's ``c0 + f / R``, so a token of a
    large model counts for more; 1 without it), with the unused budget of a stopped trial taken
    out of the plan. With the dry run's estimate of the sweep's wall time (``estimate_s``) the rate
    starts at the estimate's and moves to the measured one as the sweep runs (the estimate weighs
    as ``PRIOR_WEIGHT`` of its own time of measurement), so the first minutes, which are mostly
    start-up, do not set it. A resumed sweep counts the trials and tokens Tune restored."""

    def __init__(self, *, total: int, concurrency: int, stream=None, total_tokens: int = 0,
                 default_budget: int = 0, token_cost: Mapping[str, float] | None = None,
                 study: Study | None = None, estimate_s: float | None = None, live: bool | None = None) -> None:
        self.total, self.concurrency = total, max(1, concurrency)
        self.stream = stream
        self.t0 = time.time()
        self.last_print = 0.0
        self.trial_best: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self.token_cost = dict(token_cost or {})
        self.planned = total_tokens if not self.token_cost else sum(self.token_cost.values())
        self.planned0 = self.planned
        self.default_budget = default_budget
        self.seen: dict[str, int] = {}
        self.costs: dict[str, float] = {}  # trial id -> cost per token (relative)
        self.trained0 = 0.0  # work already done when this driver started (a resumed sweep)
        self.study = study  # names the running trials' rows (their plans)
        self.estimate_s = estimate_s
        self.live = live  # None: a live table when the stream is a terminal
        self.rows: dict[str, dict] = {}  # running trial id -> its row
        self.keys: dict[str, str] = {}  # trial id -> its point's key (every trial Tune has shown)
        self.budgets: dict[str, int] = {}  # trial id -> its token budget
        self.recent: dict[str, list[tuple[float, int]]] = {}  # trial id -> its last (time, tokens) reports
        self._display = None
        self._absorbed = False

    def setup(self, **info) -> None:
        """Called when the sweep starts, also after ``--resume`` restored this callback: the rate
        is measured from now, over the work done from now."""
        self.t0 = time.time()
        self.trained0 = self._work_done()
        self.recent = {}  # an earlier driver's clock says nothing of this one's trials
        self._absorbed = False
        self._start_display()

    def _cost(self, trial_id: str) -> float:
        return self.costs.get(trial_id, 1.0)

    def _work_done(self) -> float:
        return sum(t * self._cost(i) for i, t in self.seen.items())

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["stream"] = None  # streams do not pickle; a restored sweep prints to stderr
        state["_display"] = None
        return state

    def __setstate__(self, state: dict) -> None:  # a sweep saved by an earlier version: its defaults
        self.__dict__.update({"token_cost": {}, "costs": {}, "study": None, "estimate_s": None, "live": None,
                              "rows": {}, "_display": None, "_absorbed": False, "keys": {}, "budgets": {}, "recent": {},
                              "planned0": state.get("planned", 0), **state})

    # ---- what is shown

    def eta_s(self) -> float | None:
        """Seconds left, ``None`` before anything says."""
        elapsed = time.time() - self.t0
        trained = self._work_done()
        left = max(0.0, self.planned - trained)
        if self.planned and self.estimate_s:
            prior_s = PRIOR_WEIGHT * self.estimate_s
            rate = (trained - self.trained0 + self.planned0 / self.estimate_s * prior_s) / (elapsed + prior_s)
        elif self.planned and trained > self.trained0:
            rate = (trained - self.trained0) / max(elapsed, 1e-9)
        else:
            done = self._counts()["done"]
            return elapsed / done * max(0, self.total - done) if done else None
        if rate <= 0:
            return None
        # the rate is of all slots at work; the sweep's tail is its longest trial, which runs on
        # one slot: a running trial at its own recent speed (alone, it runs faster than its share
        # of the paired rate), one not started at one slot's share of the rate
        return max(left / rate, self._longest_left(self.concurrency / rate))

    RECENT = 4  # a running trial's own speed: over its last this many reports

    def _own_left_s(self, trial_id: str, now: float) -> float | None:
        """Seconds a running trial has left at its own speed over its recent reports (``None``
        before two reports a second apart)."""
        marks = self.recent.get(trial_id) or []
        if len(marks) < 2 or marks[-1][0] - marks[0][0] < 1.0 or marks[-1][1] <= marks[0][1]:
            return None
        speed = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])  # tokens/s
        left = max(0, self._budget_of(trial_id) - self.seen.get(trial_id, 0))
        return max(0.0, left / speed - (now - marks[-1][0]))

    def _longest_left(self, s_per_work: float) -> float:
        """Seconds the trial with the most time left takes: a trial Tune knows (at its own speed
        when it has one, else its work at ``s_per_work``), or a grid point not yet started."""
        now = time.time()
        known = []
        for i in self.keys:
            if self.states.get(i) not in (None, "running"):
                continue
            own = self._own_left_s(i, now)
            if own is None:  # its work at one slot's share, less what it has run since its start
                own = max(0, self._budget_of(i) - self.seen.get(i, 0)) * self._cost(i) * s_per_work
                marks = self.recent.get(i)
                if marks and len(marks) == 1:  # its start alone: no report yet
                    own = max(0.0, own - (now - marks[0][0]))
            known.append(own)
        started = set(self.keys.values())
        unstarted = [w * s_per_work for k, w in self.token_cost.items() if k not in started]
        return max(known + unstarted, default=0.0)

    def _budget_of(self, trial_id: str) -> int:
        return self.budgets.get(trial_id, self.default_budget)

    def _counts(self) -> dict[str, int]:
        counts = {s: sum(1 for v in self.states.values() if v == s)
                  for s in ("running", "finished", "early_stopped", "diverged", "failed")}
        counts["done"] = counts["finished"] + counts["early_stopped"] + counts["diverged"] + counts["failed"]
        return counts

    def _line(self) -> str:
        counts = self._counts()
        eta = self.eta_s()
        best = "-" if not math.isfinite(self.best) else f"{self.best:.4f}"
        work = f" | {min(100.0, 100 * self._work_done() / self.planned):.0f}% of the work" if self.planned else ""
        return (f"[moue] {counts['done']}/{self.total} done: {counts['finished']} finished, {counts['early_stopped']} "
                f"early-stopped, {counts['diverged']} diverged, {counts['failed']} failed; "
                f"{counts['running']} running | best val {best}{work} | {human_duration(time.time() - self.t0)} elapsed, "
                f"~{'?' if eta is None else _eta_text(eta)} left")

    def renderable(self):
        """The live display: the line, then one row per running trial."""
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        line = Text(self._line())
        if not self.rows:
            return line
        cells = []
        for row in self.rows.values():
            tokens = f"{row['tokens']:,} / {row['budget']:,}" if row["budget"] else f"{row['tokens']:,}"
            loss = "-" if row["loss"] is None else f"{row['loss']:.4f} {row['loss_kind']}"
            active = "-" if row["active"] is None else f"{row['active']:,}"
            cells.append((row["name"], row["family"], active, tokens, loss))
        heads = ("trial", "family", "active", "tokens", "loss")
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        width = self._display.console.width if self._display is not None else 80
        # the trial's name gives way (ellipsis) so the numbers fit the terminal
        name_w = max(12, width - sum(widths[1:]) - 3 * (len(heads) - 1))  # padding and rule
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        table.add_column(heads[0], overflow="ellipsis", no_wrap=True, max_width=name_w)
        for name in heads[1:]:
            table.add_column(name, justify="left" if name == "family" else "right", no_wrap=True)
        for c in cells:
            table.add_row(*c)
        return Group(line, table)

    def _start_display(self) -> None:
        stream = self.stream or sys.stderr
        live = self.live
        if live is None:
            live = bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"
        if not live or self._display is not None:
            return
        from rich.console import Console
        from rich.live import Live

        self._display = Live(self.renderable(), console=Console(file=stream), auto_refresh=False,
                             redirect_stdout=False, redirect_stderr=False, transient=False)
        self._display.start()

    def _stop_display(self) -> None:
        if self._display is not None:
            self._display.update(self.renderable(), refresh=True)
            self._display.stop()
            self._display = None

    def _emit(self, force: bool = False) -> None:
        now = time.time()
        if self._display is not None:
            if force or now - self.last_print >= 0.5:
                self._display.update(self.renderable(), refresh=True)
                self.last_print = now
        elif force or now - self.last_print >= 5:
            print(self._line(), file=self.stream or sys.stderr, flush=True)
            self.last_print = now

    # ---- bookkeeping

    def _budget(self, trial) -> int:
        point = (getattr(trial, "config", None) or {}).get("point") or {}
        return int(point.get("train.tokens", self.default_budget))

    def _unplan(self, trial) -> None:
        """A trial that ends before its budget will not train the rest of it."""
        if self.planned:
            left = max(0, self._budget(trial) - self.seen.get(trial.trial_id, 0))
            self.planned -= left * self._cost(trial.trial_id)

    def _row(self, trial) -> dict:
        """The running trial's row: its plan's name, family and active count where the study is known."""
        row = self.rows.get(trial.trial_id)
        if row is None:
            name, family, active, budget = trial.trial_id, "", None, self._budget(trial)
            if self.study is not None:
                from moue.studies.plan import model_family

                try:
                    plan = self.study.plan(trial.config)
                    family = model_family(plan.config)
                    name = plan.run_name.removeprefix(f"moue {family} ")  # the family has its column
                    active, budget = plan.counts.n_params_active, plan.tokens
                except Exception:  # noqa: BLE001 - a row without its plan is still a row
                    pass
            row = self.rows[trial.trial_id] = {"name": name, "family": family, "active": active, "budget": budget,
                                               "tokens": self.seen.get(trial.trial_id, 0), "loss": None,
                                               "loss_kind": ""}
        return row

    def _end(self, trial, state: str) -> None:
        self.states[trial.trial_id] = state
        self.rows.pop(trial.trial_id, None)
        if state == "diverged":
            self.trial_best.pop(trial.trial_id, None)
        self._unplan(trial)

    def _absorb(self, trials) -> None:
        """Trials this driver did not see end (a resumed sweep's): their states, tokens and losses."""
        for trial in trials:
            if trial.trial_id in self.states:
                continue
            last = trial.last_result or {}
            self._note_cost(trial)
            if isinstance(last.get(TIME_ATTR), (int, float)):
                self.seen[trial.trial_id] = int(last[TIME_ATTR])
            v = last.get(VAL_LOSS)
            if isinstance(v, (int, float)) and math.isfinite(v) and last.get("status") != "diverged":
                self.trial_best[trial.trial_id] = v
            if trial.status == "TERMINATED":
                status = last.get("status")
                self._end(trial, status if status in ("finished", "diverged") else "early_stopped")
            elif trial.status == "ERROR":
                self._end(trial, "failed")
        self.trained0 = self._work_done()

    # ---- Tune's hooks

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not self._absorbed:
            self._absorbed = True
            self._absorb(trials)
            self._emit(force=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._note_cost(trial)
        self.states[trial.trial_id] = "running"
        # its own speed from its first report on: from its start to the report (start-up included,
        # so a little slow) until it has reports of its own
        self.recent[trial.trial_id] = [(time.time(), self.seen.get(trial.trial_id, 0))]
        self._row(trial)
        self._emit()

    def _note_cost(self, trial) -> None:
        """The trial's point, budget and cost per token (``token_cost`` holds budget x cost per point)."""
        point = (getattr(trial, "config", None) or {}).get("point") or {}
        if trial.trial_id not in self.keys:
            self.keys[trial.trial_id] = point_key(point)
            self.budgets[trial.trial_id] = self._budget(trial)
        if trial.trial_id in self.costs or not self.token_cost:
            return
        work = self.token_cost.get(point_key(point))
        budget = self._budget(trial)
        if work is not None and budget:
            self.costs[trial.trial_id] = work / budget

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._note_cost(trial)
        tokens = result.get(TIME_ATTR)
        row = self._row(trial)
        if isinstance(tokens, (int, float)):
            self.seen[trial.trial_id] = row["tokens"] = int(tokens)
            marks = self.recent.setdefault(trial.trial_id, [])
            marks.append((time.time(), int(tokens)))
            del marks[:-self.RECENT]
        v = result.get(VAL_LOSS)
        if isinstance(v, (int, float)) and math.isfinite(v):
            self.trial_best[trial.trial_id] = min(self.trial_best.get(trial.trial_id, math.inf), v)
            row["loss"], row["loss_kind"] = v, "val"
        elif isinstance(result.get(TRAIN_LOSS), (int, float)):
            row["loss"], row["loss_kind"] = result[TRAIN_LOSS], "train"
        if result.get("status") == "diverged":  # its earlier losses are no result
            self.trial_best.pop(trial.trial_id, None)
        self._emit()

    @property
    def best(self) -> float:
        """The best validation loss of a trial that has not diverged."""
        return min(self.trial_best.values(), default=math.inf)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        status = (trial.last_result or {}).get("status")
        self._end(trial, status if status in ("finished", "diverged") else "early_stopped")
        self._emit(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "failed")
        self._emit(force=True)

    def on_experiment_end(self, trials, **info) -> None:
        self._stop_display()
