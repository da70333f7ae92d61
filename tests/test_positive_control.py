"""The positive control (studies/positive_control.toml): its design is the one its comment
describes, and its smoke version runs end to end into a report that decides its comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moue.analysis.decide import VERDICTS
from moue.studies.spec import load_study
from procs import moue_cli

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "studies" / "positive_control.toml"


def test_two_arms_differ_only_in_experts_per_layer_at_matched_active_counts() -> None:
    study = load_study(SPEC)
    arms = {p.config.model.window: p for p in study.plans}
    assert sorted(arms) == [2, 8]
    assert len(study.plans) == 2 * len(study.search.seeds) >= 20  # a pair per seed, 10 pairs or more
    dense, routed = arms[2].config.model, arms[8].config.model
    assert (dense.top_k, dense.expert_hidden, dense.d_model, dense.n_layers) == \
        (routed.top_k, routed.expert_hidden, routed.d_model, routed.n_layers)
    assert dense.top_k == dense.window, "the reference routes every token to all its experts"
    active = {e: p.counts.n_params_active for e, p in arms.items()}
    assert abs(active[8] - active[2]) <= 0.01 * active[2], active  # the router's rows only
    assert arms[8].counts.n_params_total > 2 * arms[2].counts.n_params_total
    (cmp,) = study.comparisons
    assert (cmp.variant, cmp.reference, cmp.pair) == (("model.window",), "2", ("train.seed",))


@pytest.mark.slow
def test_smoke_runs_end_to_end_and_its_report_decides_the_comparison(tmp_path) -> None:
    ws = tmp_path / "ws"
    run = moue_cli("run", str(SPEC), "--smoke", "--workspace", str(ws))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sweep positive_control-smoke: 6 trials (6 finished)" in run.stdout  # [smoke.search] seeds
    assert "8 vs 2 experts per layer: " in run.stdout
    assert "no law was fitted" in run.stdout and "no law is identified" not in run.stdout
    report = moue_cli("report", "positive_control-smoke", "--workspace", str(ws), "--json")
    assert report.returncode == 0, report.stdout + report.stderr
    out = json.loads(report.stdout)
    assert out["laws"] == {} and "laws: none (the study's [analysis] laws" in report.stderr  # laws = []
    (cmp,) = out["comparisons"]
    assert cmp["name"] == "8 vs 2 experts per layer" and cmp["n_pairs"] == 3
    assert cmp["verdict"] in VERDICTS and len(cmp["ci_pct"]) == 2
