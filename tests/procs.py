"""Processes the tests start, found again by a marker in their environment.

A test that starts Ray (a driver it kills, `ray start` nodes) stops exactly those processes and
their descendants, never every Ray process on the machine (`ray stop --force` would end any other
sweep running here). Every process inherits its parent's environment, so a marker variable set on
the first one identifies all of them, even after they were re-parented to init.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from moue.studies.reaper import WATCHDOG_TAG

MARK = "MOUE_TEST_PROCS"


def marked_env(base: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """A fresh marker and ``base`` (default: this environment) carrying it, without what an
    in-process sweep of an earlier test left in this environment (Ray auth and single-host
    settings, a command marker)."""
    marker = uuid.uuid4().hex
    env = dict(os.environ if base is None else base)
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MOUE_COMMAND_ID"):
        env.pop(key, None)
    env[MARK] = marker
    return marker, env


def marked_pids(marker: str) -> list[int]:
    needle = f"{MARK}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked(marker: str, timeout: float = 30.0) -> int:
    """SIGKILL every process carrying ``marker``; wait until they are gone. Returns how many."""
    pids = marked_pids(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.time() + timeout
    while time.time() < end:
        alive = [p for p in pids if running(p)]
        if not alive:
            break
        time.sleep(0.2)
    return len(pids)


def running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie has)."""
    return Path(f"/proc/{pid}").exists() and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def launched(marker: str, wait_s: float = 10.0) -> list[str]:
    """What a finished command left running besides its own watchdog (``studies/reaper.py``, which
    outlives the command by about a second by design and must then be gone too): the command
    lines of marked processes, polled for ``wait_s`` until none is left. Empty: nothing launched."""
    seen: list[str] = []
    end = time.time() + wait_s
    while True:
        pids = marked_pids(marker)
        for pid in pids:
            cmd = _cmdline(pid)
            if WATCHDOG_TAG.encode() not in cmd:  # not the watchdog
                seen.append(cmd.replace(b"\0", b" ").decode(errors="replace")[:200])
        if seen or not pids:
            return seen
        if time.time() > end:
            return ["the command's watchdog is still running after the command ended"]
        time.sleep(0.25)



ROOT = Path(__file__).resolve().parent.parent
# a `moue` command of a test runs with local token auth: no Ray auth settings of an earlier test
CLI_ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}


def moue_cli(*args: str, timeout: int = 600):
    """``moue ARGS`` in a fresh process from the repository root; its ``CompletedProcess`` (text)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", *args],
                          cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=timeout)
