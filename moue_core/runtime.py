"""Process-level settings for CPU training and benchmarks (threads, allocator).

Large temporary tensors (an MoE layer's sorted activations, a pool's gradient: tens of MB) are
served by glibc through fresh ``mmap`` calls by default and page-fault on every allocation; raising
the mmap and trim thresholds keeps them in the heap and reuses them (docs/MODEL.md section 5: measured
1.35x -> 1.13x for the pooled benchmark shape). Only glibc has ``mallopt``; elsewhere this is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

__all__ = ["configure_process", "tune_malloc", "set_threads"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def tune_malloc() -> bool:
    """Keep large allocations in the reusable heap; True when glibc accepted both settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def set_threads(n: int | None) -> int:
    """Intra-op threads for this process (a trial's CPU share); returns the value in force."""
    if n is not None and n >= 1:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def configure_process(threads: int = 0) -> None:
    """What a process that trains opts in to, once: the allocator tuning and ``threads`` intra-op
    threads (0: torch's default)."""
    tune_malloc()
    set_threads(threads or None)
