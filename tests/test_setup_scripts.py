"""The README's two fresh-machine commands (issue 15): `.ci/main` and `.ci/test` share `.ci/setup`,
which picks PyTorch's build from the machine (CUDA with an NVIDIA GPU, else the CPU build: a local
wheel where pip has one, else PyTorch's CPU index) and says which; CI runs the README's test
command. The choice is tested in the setup's plan mode (MOUE_SETUP_PLAN=1: say, do nothing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _plan(tmp_path, script=".ci/test", **env):
    run_env = {**os.environ, "MOUE_SETUP_PLAN": "1", "MOUE_VENV": str(tmp_path / "venv"),
               "PYTHON": sys.executable, **env}
    return subprocess.run([str(ROOT / script)], env=run_env, capture_output=True, text=True, timeout=120)


def _fake(tmp_path, name, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
    (bin_dir / name).chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("script", [".ci/test", ".ci/main"])
def test_no_gpu_takes_the_cpu_build_from_a_local_wheel_or_the_cpu_index(tmp_path, script):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    no_gpu = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": os.devnull}
    r = _plan(tmp_path, script, PIP_FIND_LINKS=str(wheels), **no_gpu)
    assert r.returncode == 0 and r.stdout.strip() == "torch: cpu-local", r.stderr
    r = _plan(tmp_path, script, PIP_FIND_LINKS=str(tmp_path), **no_gpu)
    assert r.returncode == 0 and r.stdout.strip() == "torch: cpu-index", r.stderr
    assert not (tmp_path / "venv").exists()  # the plan does nothing


def test_an_nvidia_gpu_takes_the_default_build_and_the_choice_can_be_forced(tmp_path):
    path = _fake(tmp_path, "nvidia-smi", 'echo "GPU 0: NVIDIA H200"') + ":/usr/bin:/bin"
    assert _plan(tmp_path, PATH=path).stdout.strip() == "torch: default"
    broken = _fake(tmp_path, "nvidia-smi", "exit 9") + ":/usr/bin:/bin"  # a driver without a GPU
    assert _plan(tmp_path, PATH=broken).stdout.strip() in ("torch: cpu-local", "torch: cpu-index")
    assert _plan(tmp_path, PATH=broken, MOUE_TORCH="default").stdout.strip() == "torch: default"
    r = _plan(tmp_path, MOUE_TORCH="rocm")
    assert r.returncode == 2 and "MOUE_TORCH must be cpu or default, not 'rocm'" in r.stderr


def test_an_installed_torch_is_kept(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # has torch 2.13.0
    (venv / "bin" / "python").chmod(0o755)
    r = _plan(tmp_path)
    assert r.stdout.strip() == "torch: installed", r.stderr


def test_an_old_python_is_refused_with_the_version(tmp_path):
    old = _fake(tmp_path, "python3.10", 'case "$*" in *version_info*) exit 1;; *-V*) echo "Python 3.10.14";; esac')
    r = _plan(tmp_path, PYTHON=f"{old}/python3.10")
    assert r.returncode == 2 and "needs Python >= 3.11" in r.stderr and "Python 3.10.14" in r.stderr


def test_ci_runs_exactly_the_readmes_two_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == [".ci/main", ".ci/test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == commands[-1]  # the README's test command, verbatim
