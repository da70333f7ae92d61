"""The Triton kernel tests (tests/triton_cases.py), isolated in their own process under the
interpreter; GPU-only cases there are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_under_the_interpreter() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", str(ROOT / "tests" / "triton_cases.py")],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "13 passed" in proc.stdout and "failed" not in proc.stdout, tail  # every CPU case ran


# Shared memory per block an sm_80 / sm_90 GPU can give one kernel (A100: 163 KiB, H100: 227 KiB).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("blocks", ["SMALL", "LARGE"])
def test_kernels_compile_for_nvidia_gpus_on_tensor_cores_without_spills(arch: int, blocks: str) -> None:
    """No GPU here, but Triton compiles for one: the bf16 kernels go down to a cubin for A100
    (sm_80) and H100 (sm_90a); each must use tensor-core instructions, spill no registers and fit
    the shared memory of one block."""
    import moue.triton_aot as aot
    import moue.triton_moe as tm

    report = aot.compile_report(arch, "bf16", getattr(tm, blocks))
    assert set(report) == {"_up_kernel", "_down_kernel"}
    for name, r in report.items():
        assert r["mma"] == ("wgmma" if arch == 90 else "mma"), (name, r)
        assert r["spill_bytes"] == 0, (name, r)
        assert 0 < r["shared_bytes"] <= SHARED_LIMIT[arch], (name, r)
        assert 0 < r["registers"] <= 255 and r["cp_async"] > 0, (name, r)  # pipelined loads


def test_compile_report_sees_spills() -> None:
    """The spill check above can fail: 128x128 tiles with two accumulators in the first kernel (the
    rejected LARGE variant, see the module docstring) spill registers on sm_80."""
    import moue.triton_aot as aot
    import moue.triton_moe as tm

    spilling = aot.compile_report(80, "bf16", tm.Blocks(m=128, n_up=128, n_down=128, k=64, warps=8, stages=3))
    assert spilling["_up_kernel"]["spill_bytes"] > 0
    assert spilling["_down_kernel"]["spill_bytes"] == 0


def test_compile_report_specialises_like_the_launcher() -> None:
    """Unit strides become constants and 16-divisible sizes get divisibility hints, as at launch:
    that is what lets Triton pipeline the loads (cp.async); without the hints (odd sizes) it
    cannot, so the report describes the kernel that would actually run for that shape."""
    import moue.triton_aot as aot
    import moue.triton_moe as tm

    aligned = aot.compile_report(90, "bf16", tm.LARGE)
    odd = aot.compile_report(90, "bf16", tm.LARGE, D=1000, F=500, P=63)
    assert all(r["cp_async"] > 0 for r in aligned.values())
    assert all(r["cp_async"] == 0 for r in odd.values())
