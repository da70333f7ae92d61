"""Every process a moue command starts ends with it, however the command ends.

A killed driver leaves Ray's agents (``ray::DashboardAgent``, ``RuntimeEnvAgent``) running, and a
killed ``moue ui`` leaves the MLflow server and its uvicorn workers. :func:`start` gives this
process a marker that every process it starts from then on inherits (in its environment) and a
small watchdog process holding the read end of a pipe. While the command runs, the watchdog notes
its descendants once a second (parent pid and start time), so a child started with another
environment, or re-parented to init when its own parent died, is still known. When the command
ends (normally, by an exception, SIGTERM or SIGKILL) the kernel closes the pipe; the watchdog then
ends every process that carries the marker or was seen descending from the command, and their
descendants: SIGTERM, and SIGKILL for what is left after a grace period, sweeping again until
nothing is left for a while (a process that was being started while the command died, such as
Ray's dashboard agent, is found by a later sweep). Not found: a process that drops the marker and
leaves the command's tree within a second of being started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

__all__ = ["MARK", "WATCHDOG_TAG", "start"]

MARK = "MOUE_COMMAND_ID"
WATCHDOG_TAG = "# moue.studies.reaper watchdog"  # the first line of its source: how it is told apart
_watchdog: subprocess.Popen | None = None

_WATCHDOG = WATCHDOG_TAG + r"""
import os, select, signal, sys, time
marker, grace = sys.argv[1].encode(), float(sys.argv[2])
needle = b"%s=%s" % (sys.argv[3].encode(), marker)
command = os.getppid()

# pid -> (parent, start time) of every live process; the start time tells a pid reused apart
def table():
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if fields[0] != b"Z":  # zombies are left to their parents
                    procs[int(name)] = (int(fields[1]), fields[19])
            except (OSError, IndexError, ValueError):
                pass
    procs.pop(os.getpid(), None)
    return procs

def carries_marker(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False

def with_descendants(roots, procs):
    tree = set(roots)
    while more := {pid for pid, (ppid, _) in procs.items() if ppid in tree and pid not in tree}:
        tree |= more
    return tree

# while the command runs: remember its descendants once a second (one given another environment,
# or re-parented to init when its parent exits, is still this command's)
known = {}
while True:
    if select.select([sys.stdin], [], [], 1.0)[0] and not os.read(sys.stdin.fileno(), 4096):
        break  # the command that started us has ended
    procs = table()
    known = {pid: start for pid, start in known.items() if procs.get(pid, (0, None))[1] == start}  # gone: forgotten
    if command in procs:
        known.update((pid, procs[pid][1]) for pid in with_descendants({command}, procs) - {command})

# then end what carries the marker, what was seen descending from the command, and their
# descendants; sweep until nothing is left for a while (a process being started as we sweep, as
# Ray's raylet starting an agent, is found by a later pass). SIGTERM first, SIGKILL after `grace`.
# Quiet for 1 s ends the watch when the command left nothing; once something was ended, 5 s.
first, quiet, deadline = {}, 0, time.time() + 120
while time.time() < deadline and quiet < (20 if first else 4):
    procs = table()
    roots = {pid for pid in procs if carries_marker(pid)}
    roots |= {pid for pid, start in known.items() if pid in procs and procs[pid][1] == start}
    pids = with_descendants(roots, procs)
    quiet = 0 if pids else quiet + 1
    now = time.time()
    for pid in pids:
        known.setdefault(pid, procs[pid][1])
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
