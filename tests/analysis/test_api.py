"""The short Python API (README, docs/API.md): ``moue.load_runs`` and ``moue.fit`` on a real store."""

from __future__ import annotations


def test_load_runs_and_fit_from_the_top_level(logged_study) -> None:
    import moue
    from moue.analysis import fit, load_runs

    uri, experiment, _, _ = logged_study
    assert moue.load_runs is load_runs and moue.fit is fit
    runs = moue.load_runs(experiment, tracking_uri=uri)
    assert runs.frame.height == 48 and "final/val_loss" in runs.frame.columns
    res = moue.fit(runs.frame, law="compute", n_bootstrap=50, seed=0)
    assert res.law == "compute" and set(res.ci) >= set(res.params)
    assert res.verdict.line().startswith(("identified", "NOT identified: "))
