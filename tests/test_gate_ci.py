"""The CI regression gate: rerun the `gate` study and check its fitted exponent against the
committed baseline (studies/baselines/gate.json). Refresh deliberately: see README, "Regression gate"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # local runs: token auth
BASELINE = ROOT / "studies" / "baselines" / "gate.json"


def moue(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:  # a hang guard: 330 s seen on three workers
    return subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gate_workspace(tmp_path_factory) -> Path:
    from test_golden import skip_on_another_corpus

    recorded = next(iter(json.loads(BASELINE.read_text())["fits"].values()))["provenance"]["corpus_fingerprint"]
    skip_on_another_corpus(recorded, tmp_path_factory.mktemp("gate-corpus"), "the gate baseline")
    ws = tmp_path_factory.mktemp("gate") / "ws"
    proc = moue("sweep", "studies/gate.toml", "--workspace", str(ws))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ws


@pytest.mark.slow
def test_rerun_passes_the_committed_baseline(gate_workspace: Path) -> None:
    proc = moue("check", "gate", "--baseline", str(BASELINE), "--workspace", str(gate_workspace), "--law", "compute_power")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alpha" in proc.stdout and "pass" in proc.stdout


def test_a_moved_exponent_fails_the_gate(gate_workspace: Path, tmp_path: Path) -> None:
    """Negative control: the same runs against a baseline whose exponent sits far away."""
    base = json.loads(BASELINE.read_text())
    fit = base["fits"]["compute_power"]
    shift = 5.0 * fit["sd"]["alpha"]  # five baseline standard deviations
    fit["params"]["alpha"] += shift
    fit["ci"]["alpha"] = [v + shift for v in fit["ci"]["alpha"]]
    samples = fit["bootstrap"]
    for key in ("alpha",):
        if isinstance(samples, dict) and key in samples:
            samples[key] = [v + shift for v in samples[key]]
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(base))
    proc = moue("check", "gate", "--baseline", str(moved), "--workspace", str(gate_workspace), "--law", "compute_power")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "regression" in (proc.stdout + proc.stderr).lower() or "fail" in proc.stdout.lower()


def test_unusable_baseline_exits_2(gate_workspace: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    proc = moue("check", "gate", "--baseline", str(junk), "--workspace", str(gate_workspace))
    assert proc.returncode == 2, proc.stdout + proc.stderr
