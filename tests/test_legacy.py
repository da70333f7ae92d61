"""A sweep saved before moue was one package resumes (issue 15): its Tune state pickles the old
module names (``studies.*``, ``moue_core.*``); ``moue run`` restores it through
``moue.studies.legacy``, and without that the state does not load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "legacy"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}


@pytest.mark.slow
def test_a_sweep_saved_under_the_old_module_names_resumes(tmp_path) -> None:
    ws = tmp_path / "ws"
    spec = tmp_path / "smoke.toml"
    spec.write_text((ROOT / "studies" / "smoke.toml").read_text().replace("seeds = [0, 1]", "seeds = [0]"))
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(HERE), ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    old = subprocess.run([sys.executable, str(HERE / "old_layout_sweep.py"), "sweep", str(spec), "--workspace", str(ws)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert old.returncode == 0, old.stdout + old.stderr
    state = (ws / "ray" / "smoke" / "tuner.pkl").read_bytes()
    assert b"studies.callbacks" in state and b"moue.studies.callbacks" not in state  # the old names

    plain = subprocess.run([sys.executable, "-c", "import pickle, sys, ray.tune; pickle.load(open(sys.argv[1], 'rb'))",
                            str(ws / "ray" / "smoke" / "tuner.pkl")], cwd="/", env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode != 0 and "No module named 'studies'" in plain.stderr, plain.stderr[-2000:]

    again = subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", "run", str(spec), "--workspace", str(ws),
                            "--bootstrap", "50"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    # (not from the repository's root: there the folders themselves import under the old names)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming the sweep" in again.stdout and "sweep smoke: 3 trials (" in again.stdout, again.stdout
    assert (ws / "reports" / "smoke.html").is_file()
