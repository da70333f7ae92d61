"""One driver per workspace (and per sweep in a shared ``--storage``).

Two drivers on one workspace would both create MLflow's schema, or both run the whole grid under
one parent run. The lock is an ``fcntl.flock`` on ``<dir>/.moue.lock``: the kernel drops it when
the holding process ends however it ends (SIGKILL included), so a stale lock of a dead driver is
simply taken by the next one; the file's text (pid, host, command, since when) only serves to say
who holds a live lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from moue.errors import ConfigError

__all__ = ["LOCK_FILE", "hold"]

LOCK_FILE = ".moue.lock"


@contextlib.contextmanager
def hold(directory: Path, *, what: str) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` for the block; exit 2 (``ConfigError``) naming the
    holder when another live process has it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(what, str(directory), f"is in use by another moue driver ({_holder(fd)}); "
                              "wait for it to end, or use another workspace") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return "holder unknown"
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: {info.get('command', '')}"
