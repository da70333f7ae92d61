"""Approach 1 (the envelope of training curves) on a synthetic law with a known optimum, and the
three approaches side by side in the report's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moue.analysis.approaches import envelope


def _curves(n_sizes=12, marks=40, alpha=0.34, beta=0.28):
    """Runs of a Chinchilla law L = E + A/N^alpha + B/D^beta at sizes spanning 3 decades, each with
    marks over 3 decades of tokens; flops per token 6N."""
    E, A, B = 1.69, 406.4, 410.7
    runs = {}
    for i, n in enumerate(np.logspace(7, 10, n_sizes)):
        tokens = np.logspace(8, 11.5, marks)
        runs[f"r{i}"] = (n, 6 * n, tokens, E + A / n**alpha + B / tokens**beta)
    return runs, beta / (alpha + beta)


def test_envelope_recovers_the_compute_optimal_exponent():
    runs, a_true = _curves()
    env = envelope(runs, bootstrap=100)
    assert env.a == pytest.approx(a_true, abs=0.05)
    assert env.a + env.b == pytest.approx(1.0, abs=1e-6)  # D = C / 6N on the envelope
    assert env.n_levels >= 5 and env.identified and env.notes  # the undecayed-marks caveat is always said


def test_envelope_with_too_few_sizes_is_not_identified():
    runs, _ = _curves(n_sizes=2)
    env = envelope(runs, bootstrap=50)
    assert not env.identified and any("distinct N" in r for r in env.reasons)


def test_report_json_lists_the_three_approaches(cli, logged_study, tmp_path):
    uri, exp, _, _ = logged_study
    r = cli("report", exp, "--tracking-uri", uri, "-o", tmp_path / "r.html", "--bootstrap", "50",
            "--law", "chinchilla", "--no-log-artifact", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["approaches"]
    names = [row["approach"] for row in rows]
    assert any(n.startswith("1:") for n in names) and any(n.startswith("2:") for n in names)
    assert "3: parametric (chinchilla)" in names
    for row in rows:
        assert row["identified"] == (not row["reasons"])
    assert "three approaches" in (tmp_path / "r.html").read_text()
