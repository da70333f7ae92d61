"""The sweep's progress display (issue 15): a table of the running trials redrawn in place on a
terminal, a time left that starts from the dry run's estimate, and counts that survive a resume."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

from moue.studies.callbacks import ProgressCallback
from moue.studies.spec import load_study

ROOT = Path(__file__).resolve().parent.parent


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _trial(trial_id: str, point: dict, status: str = "RUNNING", last: dict | None = None):
    return SimpleNamespace(trial_id=trial_id, config={"point": point}, last_result=last or {}, status=status)


def test_on_a_terminal_the_running_trials_are_a_table_redrawn_in_place() -> None:
    study = load_study(ROOT / "studies" / "smoke.toml")
    points = study.points[:2]
    stream = _Terminal()
    cb = ProgressCallback(total=len(study.points), concurrency=2, stream=stream, total_tokens=2 * study.budget_tokens,
                          default_budget=study.budget_tokens, study=study)
    cb.setup()
    a, b = _trial("a", points[0]), _trial("b", points[1])
    cb.on_trial_start(0, [], a)
    cb.on_trial_start(0, [], b)
    half = study.budget_tokens // 2
    cb.on_trial_result(0, [], a, {"tokens": half, "val/loss": 5.4321, "train/loss": 5.5})
    cb._emit(force=True)
    out = stream.getvalue()
    plan = study.plan(a.config)
    assert "trial" in out and "family" in out and plan.run_name.split(" ", 2)[2] in out  # the row names the trial
    assert f"{plan.counts.n_params_active:,}" in out  # its active parameters
    assert f"{half:,} / {study.budget_tokens:,}" in out and "5.4321 val" in out
    assert "\x1b[1A" in out and "\x1b[2K" in out  # redrawn in place: cursor up, erase line
    a.last_result = {"status": "finished"}
    cb.on_trial_complete(0, [], a)
    cb.on_experiment_end([])
    last = stream.getvalue().rsplit("[moue]", 1)[1]
    assert last.startswith(" 1/") and plan.run_name.split(" ", 2)[2] not in last  # an ended trial leaves the table
    assert cb._display is None


def test_off_a_terminal_it_prints_plain_lines() -> None:
    stream = io.StringIO()
    cb = ProgressCallback(total=1, concurrency=1, stream=stream, total_tokens=100, default_budget=100)
    cb.setup()
    cb.on_trial_start(0, [], _trial("a", {"train.tokens": 100}))
    assert cb._display is None and "\x1b" not in stream.getvalue()
    assert stream.getvalue().startswith("[moue] 0/1 done")


def test_time_left_starts_from_the_estimate_and_moves_to_the_measured_rate() -> None:
    cb = ProgressCallback(total=1, concurrency=1, stream=io.StringIO(), total_tokens=1000, default_budget=1000,
                          estimate_s=100.0)
    cb.setup()
    assert abs(cb.eta_s() - 100.0) < 1  # before any result: the estimate
    cb.t0 -= 10.0  # 10 s of start-up and no token trained: the estimate's 30 s against 10 measured
    assert abs(cb.eta_s() - 1000 / (10 * 30 / 40)) < 1, cb.eta_s()  # 133 s
    t = _trial("a", {"train.tokens": 1000})
    cb.on_trial_start(0, [], t)
    cb.t0 -= 290.0  # 300 s for 500 tokens: the sweep runs at a third of the estimate's rate
    cb.on_trial_result(0, [], t, {"tokens": 500})
    # rate (500 + 10 x 30) / (300 + 30) = 2.42 tokens/s: 500 tokens left in ~206 s (the estimate
    # alone would say 50 s, the measured rate alone 300 s)
    assert abs(cb.eta_s() - 500 / (800 / 330)) < 1, cb.eta_s()


def test_a_resumed_sweep_counts_what_tune_restored() -> None:
    """After ``--resume`` the callback is Tune's pickled copy from the sweep's start: it learns the
    finished trials and the tokens of the unfinished ones from the trials Tune restored."""
    import pickle

    cb = ProgressCallback(total=3, concurrency=1, stream=io.StringIO(), total_tokens=3000, default_budget=1000)
    restored = pickle.loads(pickle.dumps(cb))
    restored.stream = io.StringIO()
    restored.setup()
    trials = [_trial("a", {"train.tokens": 1000}, "TERMINATED", {"tokens": 1000, "status": "finished", "val/loss": 2.5}),
              _trial("b", {"train.tokens": 1000}, "TERMINATED", {"tokens": 250, "status": "running", "val/loss": 3.0}),
              _trial("c", {"train.tokens": 1000}, "PENDING", {"tokens": 500, "val/loss": 2.75})]
    restored.on_step_begin(0, trials)
    line = restored.stream.getvalue().splitlines()[-1]
    assert line.startswith("[moue] 2/3 done: 1 finished, 1 early-stopped"), line
    assert "best val 2.5000" in line
    # planned 3,000 less b's unused 750: 2,250; trained 1,750 of it (a, b, and c's checkpoint)
    assert restored.planned == 2250 and re.search(r"\| 78% of the work \|", line), line
    assert restored.trained0 == 1750  # the rate counts only what this driver trains


def _paired_then_alone() -> ProgressCallback:
    """Two slots, a short and a long trial started together, 1,000 tokens each in 10 s, then the
    short one done: the long one, with 3,000 tokens left, is what is left."""
    cb = ProgressCallback(total=2, concurrency=2, stream=io.StringIO(), total_tokens=5000, default_budget=4000)
    cb.setup()
    short, long_ = _trial("short", {"train.tokens": 1000}), _trial("long", {"train.tokens": 4000})
    cb.on_trial_start(0, [], short)
    cb.on_trial_start(0, [], long_)
    cb.t0 -= 10.0
    cb.on_trial_result(0, [], short, {"tokens": 1000})
    cb.on_trial_result(0, [], long_, {"tokens": 1000})
    short.last_result = {"status": "finished"}
    cb.on_trial_complete(0, [], short)
    return cb


def test_the_last_trial_alone_runs_on_one_slot() -> None:
    """The rate measured with both slots at work: when one long trial is what is left, the time
    left is its work at one slot's rate, not the remaining work at both slots' rate."""
    cb = _paired_then_alone()
    # 2,000 tokens in 10 s on 2 slots: 200 tokens/s, 100 a slot; the long trial's 3,000 left: 30 s
    assert round(cb.eta_s()) == 30, cb.eta_s()  # not 3,000 / 200 = 15 s


def test_the_last_trial_alone_goes_at_its_own_recent_speed() -> None:
    """Alone, the last trial runs faster than its share of the paired rate (no neighbour for memory
    bandwidth): once it has reports of its own, its time left is at its recent speed."""
    cb = _paired_then_alone()
    # its last two reports 4 s apart, 600 tokens: 150 tokens/s (the paired share said 100)
    cb.recent["long"] = [(cb.recent["long"][-1][0] - 4.0, 400), cb.recent["long"][-1]]
    assert round(cb.eta_s()) == 20, cb.eta_s()  # 3,000 left at 150 tokens/s, not 30 s at 100


def test_a_resumed_driver_forgets_the_old_clock() -> None:
    cb = ProgressCallback(total=1, concurrency=1, stream=io.StringIO(), total_tokens=100, default_budget=100)
    cb.recent["a"] = [(0.0, 10), (5.0, 20)]
    cb.setup()
    assert cb.recent == {}


def test_the_mlflow_writer_runs_beside_tunes_loop_and_its_queue_is_saved() -> None:
    """The callbacks only queue; a thread writes in order. Tune saves the queue with its
    checkpoint (``get_state``) and a restored driver writes it first (``set_state``); an error of
    the store surfaces at the next callback."""
    import threading

    import pytest

    from moue.studies.callbacks import MlflowCallback

    release, written = threading.Event(), []

    class Store:  # the tracker's interface, slow and then failing: the logic under test is ours
        def log_metrics(self, trial_id, metrics, step):
            release.wait(10)
            written.append(("log_metrics", trial_id, step))

        def flush(self):
            written.append(("flush",))

        def finish_trial(self, trial_id, **kw):
            raise ValueError("the store refused it")

    cb = MlflowCallback(study=None, tracking_uri="sqlite:////nowhere.db", sweep_id="s", parent_tags={})
    cb._tracker = Store()
    cb._submit("log_metrics", "a", {"x": 1.0}, step=1)  # returns at once: the writer waits on it
    cb._submit("flush")
    saved = cb.get_state()
    assert [m for m, _, _ in saved["queue"]] == ["log_metrics", "flush"] and written == []
    release.set()
    cb.wait_written()
    assert written == [("log_metrics", "a", 1), ("flush",)] and cb.get_state() == {"queue": []}

    restored = MlflowCallback(study=None, tracking_uri="sqlite:////nowhere.db", sweep_id="s", parent_tags={})
    restored._tracker = Store()
    restored.set_state(saved)
    restored._submit("flush")  # queued after what the killed driver had not written
    restored.wait_written()
    assert written[2:] == [("log_metrics", "a", 1), ("flush",), ("flush",)]

    restored._submit("finish_trial", "a", status="finished")
    with pytest.raises(ValueError, match="refused"):
        restored.wait_written()
    restored._stop_writer()


def test_a_trial_has_its_own_speed_from_its_first_report() -> None:
    """Its start and first report give a speed (start-up included): the last trial alone is not
    held to the paired share of the rate until its second report."""
    cb = ProgressCallback(total=1, concurrency=2, stream=io.StringIO(), total_tokens=4000, default_budget=4000)
    cb.setup()
    t = _trial("long", {"train.tokens": 4000})
    cb.on_trial_start(0, [], t)
    cb.recent["long"][0] = (cb.recent["long"][0][0] - 10.0, 0)  # started 10 s ago
    cb.t0 -= 10.0
    cb.on_trial_result(0, [], t, {"tokens": 1000})
    # 1,000 tokens in 10 s alone: 3,000 left in 30 s (the paired share would say 2 x 30 = 60 s)
    assert round(cb.eta_s()) == 30, cb.eta_s()


def test_a_trial_without_reports_counts_the_time_it_has_run() -> None:
    """Before its first report a trial's time left is its work at one slot's share less the time
    since it started: the display does not stand still while the last trial runs."""
    cb = ProgressCallback(total=2, concurrency=2, stream=io.StringIO(), total_tokens=5000, default_budget=4000)
    cb.setup()
    short, long_ = _trial("short", {"train.tokens": 1000}), _trial("long", {"train.tokens": 4000})
    cb.on_trial_start(0, [], short)
    cb.t0 -= 10.0
    cb.on_trial_result(0, [], short, {"tokens": 1000})  # 1,000 tokens in 10 s on 2 slots: 50 tokens/s a slot
    short.last_result = {"status": "finished"}
    cb.on_trial_complete(0, [], short)
    cb.on_trial_start(0, [], long_)
    full = cb.eta_s()  # 4,000 tokens at one slot's share of the rate
    cb.recent["long"][0] = (cb.recent["long"][0][0] - 15.0, 0)  # it started 15 s ago
    assert abs(cb.eta_s() - (full - 15.0)) < 0.5, (full, cb.eta_s())
