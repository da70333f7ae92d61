"""The Triton kernel tests (tests/triton_cases.py), isolated in their own process under the
interpreter; GPU-only cases there are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_under_the_interpreter() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "triton_cases.py")],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "8 passed" in proc.stdout and "failed" not in proc.stdout, tail  # every CPU case ran
