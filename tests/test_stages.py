"""A ladder's LR stage (``[lr_stage]``): the spec, the two stages' studies, and `moue run` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from moue.errors import ConfigError
from moue.studies.spec import load_study
from tests.test_run import _run

ROOT = Path(__file__).resolve().parent.parent
LADDER = (ROOT / "studies" / "ladder.toml").read_text()


def _spec(tmp_path: Path, text: str = LADDER, name: str = "ladder.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_lr_stage_spec_gives_the_scan_and_the_main_stage_at_the_rule(tmp_path) -> None:
    spec = _spec(tmp_path)
    main = load_study(spec)
    assert main.lr_stage is not None and main.lr_stage.multipliers == (0.25, 0.5, 1.0, 2.0, 4.0)
    lr = load_study(spec, stage="lr")
    assert lr.name == "ladder_lr" and lr.experiment == "ladder_lr" and lr.lr_stage is None
    # the scan: the stage's family, every size at each multiple of its rule LR, short, no branches
    assert {p["model.router"] for p in lr.points} == {"softmax"} and len(lr.points) == len(main.space_options["sizes"]) * 5
    by_size: dict[int, list[float]] = {}
    for p in lr.points:
        by_size.setdefault(p["model.d_model"], []).append(p["train.lr"])
        assert "train.cooldown_at" not in p
    mains = {p["model.d_model"]: p for p in main.points if p["model.router"] == "softmax"}
    for d, lrs in by_size.items():
        assert sorted(lrs) == pytest.approx([m * mains[d]["train.lr"] for m in (0.25, 0.5, 1, 2, 4)], rel=1e-3)
        assert lr.points[[q["model.d_model"] for q in lr.points].index(d)]["train.tokens"] < mains[d]["train.tokens"]
    # the main stage at a fitted rule: lr = c N^-e for every family's point
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"c": 0.5, "exponent": 0.3, "exponent_ci": [0.2, 0.4], "sizes": [],
                                "identified": True, "reasons": []}))
    at_rule = load_study(spec, lr_rule=rule)
    assert at_rule.lr_rule_file == str(rule.resolve())
    from moue.search_spaces.matching import active_params

    for p in at_rule.points:
        n = active_params({**at_rule.fixed, **p})
        assert p["train.lr"] == pytest.approx(0.5 * n ** -0.3, rel=1e-3)
    smoke = load_study(spec, smoke=True, stage="lr")  # [smoke.lr_stage] overrides the table
    assert smoke.experiment == "ladder_lr-smoke" and len(smoke.points) == 2 * 4


def test_bracket_extension_scans_past_the_edge_of_the_sizes_that_need_it(tmp_path) -> None:
    from moue.studies.stages import _edges

    spec = _spec(tmp_path)
    base = {p["model.d_model"]: p["train.lr"] for p in load_study(spec).points if p["model.router"] == "softmax"}
    from moue.search_spaces.matching import active_params

    main = load_study(spec)
    n32 = next(active_params({**main.fixed, **p}) for p in main.points if p["model.d_model"] == 32)
    ext = load_study(spec, stage="lr", lr_extension=("_up1", [8.0, 16.0], [n32]))
    assert ext.name == "ladder_lr_up1" and ext.experiment == "ladder_lr"
    assert [(p["model.d_model"], p["train.lr"]) for p in ext.points] == [(32, pytest.approx(8 * base[32])),
                                                                           (32, pytest.approx(16 * base[32]))]

    class Rule:  # the sizes of an moue.analysis.lr_rule.LrRule
        sizes = ({"n": 1e4, "lrs": [1, 2, 4], "lr_opt": 4, "flags": ["edge"]},
                 {"n": 2e4, "lrs": [1, 2, 4], "lr_opt": 1, "flags": ["edge"]},
                 {"n": 3e4, "lrs": [1, 2, 4], "lr_opt": 2.2, "flags": []})
    assert _edges(Rule) == {"up": [10000], "down": [20000]}


@pytest.mark.parametrize("edit, field", [
    (("[search]\nspace = \"ladder\"", "[search]\nspace = \"virtual_width\""), "lr_stage"),
    (("multipliers = [0.25, 0.5, 1.0, 2.0, 4.0]", "multipliers = [0.5, 2.0]"), "lr_stage.multipliers"),
    (("families = [\"layerwise\"]\non", "families = [\"dense\"]\non"), "lr_stage.families"),
    (("on_unidentified = \"stop\"", "on_unidentified = \"maybe\""), "lr_stage.on_unidentified"),
    (("tokens_per_param = 5.0\nfam", "tokens_per_param = 0\nfam"), "lr_stage.tokens_per_param"),
    (("on_unidentified = \"stop\"", "on_unidentified = \"stop\"\nlr = 1"), "lr_stage.lr"),
])
def test_lr_stage_bad_input_names_the_field(tmp_path, edit, field) -> None:
    old, new = edit
    assert old in LADDER
    spec = _spec(tmp_path, LADDER.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        load_study(spec, stage="lr")
    assert exc.value.field == field


@pytest.mark.slow
def test_moue_run_ladder_tunes_lr_first_stops_on_an_unidentified_rule_then_resumes(tmp_path) -> None:
    # the smoke ladder's two sizes cannot identify a rule: "stop" ends the study after the LR stage
    spec = _spec(tmp_path, LADDER.replace('on_unidentified = "use"', 'on_unidentified = "stop"'))
    ws = tmp_path / "ws"
    first = _run(str(spec), "--smoke", "--workspace", str(ws), "--bootstrap", "50")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "LR stage: 8 trials" in first.stdout and "LR rule: NOT identified" in first.stdout
    err = first.stderr.strip().splitlines()[-1]
    assert err.startswith("error: the LR rule is not identified") and "lr_stage.on_unidentified" in err
    rule_file = ws / "reports" / "ladder-smoke_lr_rule.json"
    rule = json.loads(rule_file.read_text())
    assert not rule["identified"] and len(rule["sizes"]) == 2
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    assert client.get_experiment_by_name("ladder-smoke") is None, "the main stage did not start"
    lr_exp = client.get_experiment_by_name("ladder_lr-smoke")

    def lr_trials():
        return [r for r in client.search_runs([lr_exp.experiment_id]) if r.data.tags.get("moue.kind") == "trial"]

    n_lr = len(lr_trials())  # the scan's 8, and 2 per size and round of bracket extension
    extensions = first.stdout.count("LR stage, extension ")
    assert n_lr >= 8 + 2 * extensions and extensions <= 2 * 2

    # the researcher accepts the rule: the LR stage resumes (no trial reruns), the main stage runs at it
    spec.write_text(LADDER)
    again = _run(str(spec), "--smoke", "--workspace", str(ws), "--bootstrap", "50")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming the sweep" in again.stdout and "main stage: 2 trials at lr = " in again.stdout
    assert len(lr_trials()) == n_lr, "no LR trial runs again"
    rule = json.loads(rule_file.read_text())
    main_exp = client.get_experiment_by_name("ladder-smoke")
    mains = [r for r in client.search_runs([main_exp.experiment_id]) if r.data.tags.get("moue.kind") == "trial"]
    assert len(mains) == 2
    for r in mains:
        n = float(r.data.params["derived.n_params_active"])
        assert float(r.data.params["train.lr"]) == pytest.approx(rule["c"] * n ** -rule["exponent"], rel=1e-3)
    html = (ws / "reports" / "ladder-smoke.html").read_text()
    assert "Learning rate per size (the LR stage)" in html and "LR stage: lr = " in html
    # `moue report` finds the study's own laws (its logged spec) and its LR rule, and keeps run's report
    import subprocess
    import sys

    from tests.test_run import ENV

    rep = subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", "report", "ladder-smoke",
                          "--workspace", str(ws), "--bootstrap", "20", "--no-log-artifact"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "Downloading artifacts" not in rep.stderr  # no MLflow progress bars on the console
    assert "laws: chinchilla, compute, compute_power, vw_multiplicative (the study's [analysis] laws" in rep.stdout
    written = ws / "reports" / "ladder-smoke-report.html"
    assert f"wrote {written}" in rep.stdout and "Learning rate per size" in written.read_text()
    assert (ws / "reports" / "ladder-smoke.html").read_text() == html, "moue run's report is not overwritten"


def test_resume_ignores_settings_no_trial_depends_on(tmp_path) -> None:
    from types import SimpleNamespace

    from moue.studies.runner import _check_resumable

    spec = _spec(tmp_path)
    study = load_study(spec)
    edited = LADDER.replace("multipliers = [0.1, 1.0, 10.0, 100.0]", "multipliers = [0.5, 1.0, 2.0]")
    edited = edited.replace('on_unidentified = "stop"', 'on_unidentified = "use"', 1)
    assert edited != LADDER
    _check_resumable(study, SimpleNamespace(spec_sha256="x", spec_text=edited))  # [smoke.*], on_unidentified
    with pytest.raises(ConfigError, match="tokens_per_param"):
        _check_resumable(study, SimpleNamespace(spec_sha256="x", spec_text=LADDER.replace(
            "tokens_per_param = 20.0", "tokens_per_param = 10.0")))
