"""The vector width of the fitter's compiled kernels, chosen from the CPU at run time.

LLVM tunes most AVX-512 Intel CPUs with ``prefer-256-bit``: loops are vectorised in 256-bit
registers even where 512-bit ones exist (a guard against the clock drop of early AVX-512 parts).
The objective's kernel (:mod:`moue.analysis.kernels`) is a loop over points that vectorises
whole, and on a 2-core Intel Xeon (LLVM's ``rocketlake``) it ran 1.3-1.5x faster in 512-bit
vectors: 5.5 ms against 3.7-4.2 ms per evaluation of 4,500 Chinchilla starts, with the same
results to 4e-12 relative (the sums' order). So where the CPU has AVX-512, numba compiles for it
with that preference removed; on CPUs without AVX-512 nothing changes.

The setting is numba's, so it holds for the whole process: numba code of other libraries that is
compiled later in the same process is compiled for 512-bit vectors too (its fastmath sums may then
add in another order, and its cache entries for the other width are not reused). To keep numba's
defaults, set ``MOUE_NUMBA_WIDE=0``, or set ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` yourself.

numba fixes its CPU target's features when the first ``njit`` function is declared in a process,
so :func:`configure` runs when this module is imported, which the kernel modules do before they
declare any. It changes nothing where the user chose (the variables above), or where numba's CPU
target already exists (another library declared a numba function first; numba keeps it in the
private ``_toplevel_target_context`` of ``numba.core.registry.cpu_target``, which the tests watch):
then the kernels run as numba's defaults compile them. numba's on-disk cache keys machine code by
the features, so the two widths never mix. Measured only on that Intel CPU; on the Skylake-SP
generation, whose 512-bit instructions lower the clock more, the gain may be smaller.
"""

from __future__ import annotations

__all__ = ["WIDE", "configure"]

_NARROW = "prefer-256-bit"


def configure() -> bool:
    """Let numba's CPU target use 512-bit vectors where the CPU has AVX-512; whether it now does."""
    import os

    from numba.core import config, registry
    from numba.core.codegen import get_host_cpu_features

    if os.environ.get("MOUE_NUMBA_WIDE", "1") == "0":
        return False
    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return False  # the user's choice (or ours, already made)
    if "_toplevel_target_context" in vars(registry.cpu_target):
        return False  # numba's target already exists: too late to change it in this process
    features = get_host_cpu_features()
    if "+avx512f" not in features.split(","):
        return False
    config.CPU_FEATURES = f"{features},-{_NARROW}"
    return True


WIDE = configure()  # whether this process's kernels compile for 512-bit vectors
