"""Adaptive studies (issue 34): the [design] table, the Tune searcher, the record on the parent run
and in the report, and a resumed driver that continues the same design."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moue.errors import ConfigError
from moue.studies.adaptive import AdaptiveSearcher, build_design
from moue.studies.spec import load_study
from procs import CLI_ENV, moue_cli

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "studies" / "adaptive.toml"


def _spec(tmp_path: Path, **design) -> Path:
    """studies/adaptive.toml with [design] settings replaced (value: the TOML text)."""
    rule = SPEC.parent / "results" / "ladder_lr_rule.json"
    text = SPEC.read_text().replace('"results/ladder_lr_rule.json"', json.dumps(str(rule)))
    for key, value in design.items():
        head, sep, tail = text.partition(f"\n{key} = ")
        assert sep, key
        text = head + f"\n{key} = {value}" + tail[tail.index("\n"):]
    path = tmp_path / "adaptive.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the spec


def test_shipped_study_is_a_design_over_its_grid() -> None:
    study = load_study(SPEC)
    assert study.design.target == "family:MoUE-style" and study.design.precision == 0.01
    design = build_design(study)
    arms = [c.arm for c in design.candidates]
    assert arms.count("variant") == arms.count("reference") == len(study.points) // 2  # two families
    assert len({c.stratum for c in design.candidates}) == 3  # d_model 32, 48, 64
    first = design.initial()
    assert len(first) == 8  # a pair at every size, and a second one at the cheapest
    assert sum(design.by_index[i].cost for i in first) < study.design.budget_flops


def test_dry_run_shows_the_candidates_and_the_first_round() -> None:
    r = moue_cli("sweep", str(SPEC), "--smoke", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "adaptive design: target family:MoUE-style, precision 0.01" in r.stdout
    assert "first round (6 trials" in r.stdout
    assert "(at most: the adaptive design below chooses which to train)" in r.stdout


@pytest.mark.parametrize(("design", "field", "says"), [
    ({"target": '"family:UniPool-style"'}, "design.target", "must name one family of the study"),
    ({"target": '"speed:fast"'}, "design.target", "must be KIND:NAME"),
    ({"target": '"exponent:compute_power.beta"'}, "design.target", "names no parameter of compute_power"),
    ({"target": '"comparison:nope"'}, "design.target", "names no [[analysis.comparisons]] entry"),
    ({"precision": "1.5"}, "design.precision", "as a fraction"),
    ({"budget_flops": "1e3"}, "design.budget_flops", "less than the cheapest trial"),
    ({"batch": "0"}, "design.batch", ">= 1"),
    ({"algorithm": '"tpe"\nnum_samples = 4'}, "search.algorithm", "must be 'grid' in a study with [design]"),
])
def test_bad_design_input_names_the_field(tmp_path, design, field, says) -> None:
    with pytest.raises(ConfigError) as e:
        load_study(_spec(tmp_path, **design))
    assert e.value.field == field and says in str(e.value), str(e.value)


def test_bad_design_exits_2_before_anything_is_written(tmp_path) -> None:
    ws = tmp_path / "ws"
    r = moue_cli("run", str(_spec(tmp_path, target='"family:nope"')), "--workspace", str(ws))
    assert r.returncode == 2 and "design.target ('family:nope')" in r.stderr, r.stderr
    assert not ws.exists()


# ----------------------------------------------------------------------------- the searcher, driven by hand


def _result(loss: float) -> dict:
    return {"status": "finished", "final/val_loss": loss}


def _drive(searcher: AdaptiveSearcher, losses: dict[int, float], start: int, stop: int, pending: dict) -> list:
    """Ask for trials ``start..stop-1`` (ids ``t<n>``); complete each as soon as the searcher waits."""
    handed = []
    for n in range(start, stop):
        tid = f"t{n}"
        got = searcher.suggest(tid)
        while got is None:  # a round is running: finish it
            done_id, index = next(iter(pending.items()))
            searcher.on_trial_complete(done_id, _result(losses[index]))
            del pending[done_id]
            got = searcher.suggest(tid)
        if got == "FINISHED":
            return handed
        index = searcher.study.points.index(got["point"])
        pending[tid] = index
        handed.append(index)
    return handed


def test_searcher_hands_out_rounds_and_a_restored_one_continues_identically(tmp_path) -> None:
    study = load_study(SPEC, smoke=True)
    losses = {i: 3.0 + 0.01 * (i % 7) for i in range(len(study.points))}
    a = AdaptiveSearcher(study, metric="val/loss", record=tmp_path / "a.json")
    pending: dict[str, int] = {}
    first = _drive(a, losses, 0, 9, pending)
    assert first[:6] == a.design.proposed[:6] and len(set(first)) == len(first)
    a.save(str(tmp_path / "state.json"))
    b = AdaptiveSearcher(study, metric="val/loss", record=tmp_path / "b.json")
    b.restore(str(tmp_path / "state.json"))
    assert b.suggest("t3") == {"point": study.points[first[3]]}  # a restored trial keeps its point
    rest_a = _drive(a, losses, 9, 40, dict(pending))
    rest_b = _drive(b, losses, 9, 40, dict(pending))
    assert rest_a == rest_b and rest_a, (rest_a, rest_b)
    assert a.suggest("t99") == "FINISHED" and a.design.stopped
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["finished"] and record["stop"] == a.design.stopped
    assert all(p["reason"] for look in record["looks"] for p in look["proposals"])


def test_the_searcher_keeps_tunes_concurrency_limit(tmp_path) -> None:
    """Tune's limit lives in the searcher (``set_max_concurrency``), not in a ConcurrencyLimiter that
    would drop the result of a trial retrained after a resume (review of issue 34)."""
    s = AdaptiveSearcher(load_study(SPEC, smoke=True), metric="val/loss", record=tmp_path / "r.json")
    assert s.set_max_concurrency(2) is True
    assert s.suggest("t0") is not None and s.suggest("t1") is not None
    assert s.suggest("t2") is None  # two running: wait
    s.on_trial_complete("t0", _result(3.0))
    assert s.suggest("t2") is not None


def test_log_design_is_idempotent(tmp_path) -> None:
    """A resumed sweep logs its design record again: the curves keep one point per look."""
    import mlflow

    from moue.studies.tracking import log_design

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri()))
    looks = [{"round": r, "estimate": 0.1 * r, "lo": -1.0, "hi": float("inf"), "half_width": float("inf"),
              "compute_flops": 1e9 * r, "n_trials": 2 * r} for r in range(3)]
    record = {"looks": looks, "stop": "budget spent", "verdict": "undecided"}
    for _ in range(2):
        log_design(uri, run.info.run_id, record)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "design/estimate")] == [0, 1, 2]
    assert client.get_metric_history(run.info.run_id, "design/hi") == []  # not finite: not logged
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["moue.design.stop"] == "budget spent" and tags["moue.design.verdict"] == "undecided"


def test_a_failed_trial_is_recorded_and_its_pair_not_used(tmp_path) -> None:
    study = load_study(SPEC, smoke=True)
    s = AdaptiveSearcher(study, metric="val/loss", record=tmp_path / "r.json")
    ids = [f"t{n}" for n in range(6)]
    points = [s.suggest(t)["point"] for t in ids]
    s.on_trial_complete(ids[0], None, error=True)
    s.on_trial_complete(ids[1], {"status": "diverged", "final/val_loss": float("inf")})
    for t in ids[2:]:
        s.on_trial_complete(t, _result(3.0))
    index = [study.points.index(p) for p in points]
    assert s.design.results[index[0]] is None and s.design.results[index[1]] is None
    assert sum(len(v) for v in s.design._pairs().values()) == 2  # the first pair is lost, the others count


# ----------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_smoke_runs_adaptively_into_mlflow_and_the_report(tmp_path) -> None:
    import mlflow

    ws = tmp_path / "ws"
    run = moue_cli("run", str(SPEC), "--smoke", "--workspace", str(ws), "--bootstrap", "50")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "design family:MoUE-style: " in run.stdout, run.stdout
    record = json.loads((ws / "designs" / "adaptive-smoke.json").read_text())
    assert record["finished"] and record["stop"], record["stop"]
    assert record["proposed"] < record["n_candidates"]  # it chose; it did not run the grid
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adaptive-smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("moue.kind") == "study")
    trials = [r for r in runs if r.data.tags.get("moue.kind") == "trial"]
    assert len(trials) == record["proposed"]  # exactly the trials the design proposed, each once
    assert len({r.info.run_name for r in trials}) == len(trials)
    assert parent.data.tags["moue.design.stop"] == record["stop"]
    assert parent.data.tags["moue.design.verdict"] == record["verdict"]
    shown = json.loads(Path(client.download_artifacts(parent.info.run_id, "design.json")).read_text())
    assert shown["looks"] == record["looks"]
    report = moue_cli("report", "adaptive-smoke", "--workspace", str(ws), "--json")
    assert report.returncode == 0, report.stderr
    design = json.loads(report.stdout)["design"]
    assert design["stop"] == record["stop"] and len(design["looks"]) == len(record["looks"])
    html = (ws / "reports" / "adaptive-smoke-report.html").read_text()
    assert "Adaptive design: what it trained and why it stopped" in html


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_interrupted_driver_resumes_the_same_design(tmp_path) -> None:
    """Ctrl-C after the design's first look, then ``--resume``: the design goes on from its saved
    state: no trial trained twice, no look repeated, every proposal distinct."""
    import mlflow

    spec = _spec(tmp_path)
    text = spec.read_text().replace("tokens_per_param = 0.2", "tokens_per_param = 1.0")  # trials of seconds
    spec.write_text(text.replace("budget_flops = 2e9", "budget_flops = 8e9"))
    ws = tmp_path / "ws"
    record_file = ws / "designs" / "adaptive-smoke.json"
    args = [sys.executable, "-c", "from moue.studies.cli import main; main()", "sweep", str(spec), "--smoke",
            "--workspace", str(ws)]
    proc = subprocess.Popen(args, cwd=ROOT, env=CLI_ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if record_file.is_file() and json.loads(record_file.read_text())["looks"]:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("no look within 300 s")
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=180)
    before = json.loads(record_file.read_text())
    assert not before["finished"]
    again = moue_cli("sweep", str(spec), "--smoke", "--workspace", str(ws), "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    after = json.loads(record_file.read_text())
    assert after["finished"] and after["stop"]
    assert after["looks"][: len(before["looks"])] == before["looks"]  # the earlier looks stand, none redone
    assert [lk["round"] for lk in after["looks"]] == list(range(len(after["looks"])))
    proposed = after["state"]["proposed"]
    assert len(set(proposed)) == len(proposed)
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adaptive-smoke")
    finished = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("moue.kind") == "trial"
                and r.data.tags.get("moue.status") == "finished"]
    names = [r.info.run_name for r in finished]
    assert len(names) == len(set(names)) == len(proposed), (len(names), len(set(names)), len(proposed))


def test_a_trials_rows_are_its_final_loss_then_its_branches_in_order() -> None:
    from moue.analysis.design import Candidate
    from moue.studies.adaptive import _losses

    c = Candidate(index=0, cost=1.0, seed=0, rows=({}, {}, {}))
    result = {"status": "finished", "final/val_loss": 2.0, "final/cooldown/200/val_loss": 2.5,
              "final/cooldown/100/val_loss": 3.0, "final/cooldown/100/tokens": 5}
    assert _losses(result, c) == (2.0, 3.0, 2.5)
    assert _losses({**result, "status": "diverged"}, c) is None
