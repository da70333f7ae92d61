"""``moue bench design`` (moue.analysis.design_bench) on a few repetitions: its figures and text,
common random numbers, and the adaptive design spending less than the grid on the law target."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from moue.analysis.design_bench import (GOALS, SCENARIOS, describe, measure, repetition, run_design_bench,
                                        scenario)
from moue.analysis.errors import AnalysisError

POLICY_KEYS = {"mean_compute_flops", "mean_trials", "mean_looks", "verdicts", "coverage", "detected", "ruled_out"}


@pytest.fixture(scope="module")
def small():
    """Three repetitions of every scenario, in this process."""
    return measure(3, seed=0, workers=1)


def test_figures_have_every_key(small):
    assert small["simulated"] is True and set(small["scenarios"]) == set(SCENARIOS)
    for s in small["scenarios"].values():
        assert {"target", "precision", "truth", "reps", "compute_ratio", "compute_ratio_to_whole_grid",
                "adaptive", "grid", "grid_compute_flops"} <= set(s)
        assert set(s["adaptive"]) == set(s["grid"]) == POLICY_KEYS and s["reps"] == 3
        assert set(s["compute_ratio"]) == {"ratio", "mc_se"} and s["compute_ratio"]["ratio"] > 0
        assert set(s["adaptive"]["coverage"]) == {"rate", "mc_se", "count", "n"}
        assert 0 < s["compute_ratio_to_whole_grid"] <= 1
    assert set(small["goals"]) == {"compute_ratio[family]", "truth_coverage[family]", "compute_ratio[exponent]",
                                   "truth_coverage[exponent]", "false_detection_rate[family_null]"}
    assert {"cpu", "wall_s", "workers"} <= set(small)
    json.dumps(small)  # the --json output is one object


def test_text_says_simulated_and_names_every_goal(small):
    text = describe(small)
    assert "SIMULATED" in text and "2.4%" in text and "1% log noise" in text and "70.04" in text
    for name in small["goals"]:
        assert name in text
    assert text.count("compute_ratio ") == len(SCENARIOS) and "false_detection_rate" in text


def test_both_policies_see_the_same_outcomes(monkeypatch):
    """Common random numbers: one draw per repetition, seeded by (seed, scenario, repetition), and
    both policies run on it."""
    from moue.analysis import design_bench

    seen = []
    real = design_bench.simulate

    def spy(sc, policy, outcomes, *, seed=0):
        seen.append((policy, outcomes))
        return real(sc, policy, outcomes, seed=seed)

    monkeypatch.setattr(design_bench, "simulate", spy)
    a, g, _ = repetition("exponent", 0, 0)
    assert [p for p, _ in seen] == ["adaptive", "grid"] and seen[0][1] == seen[1][1]
    assert seen[0][1] == scenario("exponent").draw(np.random.default_rng([0, 2, 0]))
    assert a.compute > 0 and g.compute > 0
    repetition("exponent", 1, 0)
    assert seen[2][1] != seen[0][1]  # another repetition, another draw


def test_adaptive_spends_less_than_the_grid_on_the_law_target():
    r = measure(10, seed=0, names=("exponent",), workers=1)["scenarios"]["exponent"]
    assert r["adaptive"]["mean_compute_flops"] < r["grid"]["mean_compute_flops"]
    assert r["compute_ratio"]["ratio"] < 1


def test_workers_do_not_change_the_figures():
    one = measure(2, seed=1, names=("family",), workers=1)["scenarios"]["family"]
    two = measure(2, seed=1, names=("family",), workers=2)["scenarios"]["family"]
    for key in ("compute_ratio", "adaptive", "grid"):
        assert one[key] == two[key]


def test_run_prints_one_json_object():
    buf = io.StringIO()
    run_design_bench(json=True, reps=2, workers=1, stream=buf)
    out = json.loads(buf.getvalue())
    assert set(out["scenarios"]) == set(SCENARIOS) and "goals" in out


def test_bad_reps_name_the_option():
    with pytest.raises(AnalysisError, match="--reps"):
        measure(1)
    with pytest.raises(AnalysisError, match="scenarios"):
        measure(2, names=("nope",))


def test_goals_are_the_issues():
    assert GOALS == {"compute_ratio": 0.6, "truth_coverage": 0.90, "false_detection_rate": 0.07}


def _app():
    import typer

    from moue.analysis.cli import register

    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    return app


def test_cli_bench_design():
    from typer.testing import CliRunner

    r = CliRunner().invoke(_app(), ["bench", "design", "--reps", "2", "--seed", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["seed"] == 3 and out["scenarios"]["exponent"]["reps"] == 2
    bad = CliRunner().invoke(_app(), ["bench", "design", "--reps", "1"])
    assert bad.exit_code == 2 and "--reps" in bad.output


@pytest.mark.slow
def test_goals_at_100_repetitions():
    """The issue's goals at 100 repetitions (about 75 s on two idle cores), except the paired
    scenario's compute ratio: Cochran's optimum allocation bounds it at 0.767 of the grid's equal
    allocation for this ladder (module docstring), so it is held to that bound plus Monte Carlo
    and stopping noise instead of 0.6."""
    r = measure(100, seed=0)
    goals = r["goals"]
    for name in ("truth_coverage[family]", "truth_coverage[exponent]", "compute_ratio[exponent]",
                 "false_detection_rate[family_null]"):
        assert goals[name]["met"], (name, goals[name])
    assert r["scenarios"]["family"]["compute_ratio"]["ratio"] <= 0.9
    assert r["scenarios"]["family_null"]["adaptive"]["ruled_out"]["rate"] >= 0.9
