"""The suite runs on two pytest-xdist workers by default (``-n auto`` in pyproject.toml, two here):
the integration tests spend much of their time waiting on Ray, MLflow servers and subprocesses,
so a second worker fills the idle CPU. ``-n 0`` runs it in one process.

Each worker starts its own Ray clusters and servers (own ports, ``address="local"``), and the tests
that look for leftover processes find theirs by a marker of their own (``tests/procs.py``), so two
workers do not see each other's. Modules holding a test marked ``slow`` run first, so that the
longest tests do not start at the end and leave one worker running alone.
"""

from __future__ import annotations

import os

import pytest

WORKERS = 2  # each integration test starts a Ray cluster sized to the whole machine: more workers oversubscribe it


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(WORKERS, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    heavy = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in heavy)  # stable: each module's tests stay together, in order
