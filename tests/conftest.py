"""The suite runs on two pytest-xdist workers by default (``-n auto`` in pyproject.toml, two at
most): the integration tests spend much of their time waiting on Ray, MLflow servers and
subprocesses, so a second worker fills the idle CPU. ``-n 0`` runs it in one process;
``-m 'not slow'`` leaves out the longest integration tests.

Each worker starts its own Ray clusters and servers (``address="local"``, free ports), and the
tests that look for leftover processes find theirs by a marker of their own (``tests/procs.py``),
so two workers do not see each other's.
"""

from __future__ import annotations

import os

import pytest

WORKERS = 2  # each integration test starts a Ray cluster sized to the whole machine: more workers oversubscribe it


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(WORKERS, os.cpu_count() or 1))
