"""Every process a moue command starts ends with it, however the command ends.

A killed driver leaves Ray's agents (``ray::DashboardAgent``, ``RuntimeEnvAgent``) running, and a
killed ``moue ui`` leaves the MLflow server and its uvicorn workers. :func:`start` gives this
process a marker that every process it starts from then on inherits (in its environment) and a
small watchdog process holding the read end of a pipe. When the command ends (normally, by an
exception, SIGTERM or SIGKILL) the kernel closes the pipe; the watchdog then ends every process
that carries the marker: SIGTERM, and SIGKILL for what is left after a grace period, sweeping
again until nothing marked has been left for a second (a process that was being started while
the command died, such as Ray's dashboard agent, is found by a later sweep).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

__all__ = ["MARK", "start"]

MARK = "MOUE_COMMAND_ID"
_watchdog: subprocess.Popen | None = None

_WATCHDOG = r"""
import os, signal, sys, time
marker, grace = sys.argv[1].encode(), float(sys.argv[2])
sys.stdin.buffer.read()  # returns when the command that started us has ended
needle = b"%s=%s" % (sys.argv[3].encode(), marker)

def marked():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found

# keep sweeping until nothing marked is left for a while: a process being started as we sweep
# (Ray's raylet starting an agent) is found by a later pass. SIGTERM first, SIGKILL after `grace`.
first, quiet, deadline = {}, 0, time.time() + 120
while time.time() < deadline and quiet < 4:
    pids = marked()
    quiet = 0 if pids else quiet + 1
    now = time.time()
    for pid in pids:
        seen = first.setdefault(pid, now)
        try:
            if seen == now:
                os.kill(pid, signal.SIGTERM)
            elif now - seen > grace:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.25)
"""


def start(grace_s: float = 3.0) -> None:
    """Mark this command's future children and start their watchdog (once per process; Linux)."""
    global _watchdog
    if _watchdog is not None or not os.path.isdir("/proc"):
        return
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != MARK}
    _watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, marker, str(grace_s), MARK], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                 start_new_session=True, close_fds=True)
    os.environ[MARK] = marker
