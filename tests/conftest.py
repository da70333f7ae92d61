"""The suite runs on pytest-xdist workers (``-n auto`` in pyproject.toml): one more than the
CPUs, three at most (three on a 2-core machine). The integration tests spend much of their time
waiting on Ray, MLflow servers and subprocesses: on two workers a 2-core Xeon was busy about 58%
of the time; three workers (with the MLflow servers' job runner off) ran the suite in 749 s
against 883 s on two before (``studies/LOG.md``, 2026-12-07 session 14). ``-n 0`` runs it in
one process; ``-m 'not slow'`` leaves out the longest integration tests.

Each worker starts its own Ray clusters and servers (``address="local"``, free ports), and the
tests that look for leftover processes find theirs by a marker of their own (``tests/procs.py``),
so two workers do not see each other's.
"""

from __future__ import annotations

import os

import pytest

WORKERS = 3  # each integration test starts a Ray cluster sized to the whole machine: more workers oversubscribe it


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    cpus = os.cpu_count() or 1
    return 1 if cpus < 2 else min(WORKERS, cpus + 1)
