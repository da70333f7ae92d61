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
Ray's dashboard agent, is found by a later sweep). A process started in the command's last second
and orphaned with it before any pass saw it is found by its process group, which it inherited
(its marker may not show: Ray's agents write their title over their environment). Not found: a
process that leaves both the command's tree and its process group within a second of being
started. Wrongly ended, in principle: a daemon that a shell script sharing the command's process
group (no job control) starts within half a second of the command's end.
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

# pid -> (parent, start time, process group) of every live process; the start time (clock ticks
# since boot) tells a pid reused apart
def table():
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if fields[0] != b"Z":  # zombies are left to their parents
                    procs[int(name)] = (int(fields[1]), int(fields[19]), int(fields[2]))
            except (OSError, IndexError, ValueError):
                pass
    procs.pop(os.getpid(), None)
    return procs

def ticks_now():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")

def carries_marker(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False

def with_descendants(roots, procs):
    tree = set(roots)
    while more := {pid for pid, (ppid, _, _) in procs.items() if ppid in tree and pid not in tree}:
        tree |= more
    return tree

# while the command runs: remember its descendants once a second (one given another environment,
# or re-parented to init when its parent exits, is still this command's)
known, group = {}, int(sys.argv[4])  # the command's process group, given: it may die before we look
while True:
    if select.select([sys.stdin], [], [], 1.0)[0] and not os.read(sys.stdin.fileno(), 4096):
        break  # the command that started us has ended
    procs = table()
    known = {pid: start for pid, start in known.items() if procs.get(pid, (0, None))[1] == start}  # gone: forgotten
    if command in procs:
        known.update((pid, procs[pid][1]) for pid in with_descendants({command}, procs) - {command})

# A process started in the last second of the command, whose parent died with the command before
# any pass saw it, is in none of those: re-parented to init, and its marker may be gone from what
# /proc shows (setproctitle, as Ray's agents call it, writes the title over the environment). It
# is still in the command's process group, which it inherited: an orphan of that group (its parent
# outside the group) started within 2 s of the command's end, and after this watchdog (so not a
# process the shell started with the command, as `tee` in `moue sweep | tee log`), is the command's.
died, tick = ticks_now(), os.sysconf("SC_CLK_TCK")
with open("/proc/self/stat", "rb") as f:
    born = int(f.read().rsplit(b")", 1)[1].split()[19])
window = (max(born, died - 2 * tick), died + 0.5 * tick)

def orphans(procs):
    return {pid for pid, (ppid, start, pgid) in procs.items()
            if pgid == group and window[0] <= start <= window[1] and procs.get(ppid, (0, 0, None))[2] != group}

# then end what carries the marker, what was seen descending from the command, those orphans and
# their descendants; sweep until nothing is left for a while (a process being started as we sweep,
# as Ray's raylet starting an agent, is found by a later pass). SIGTERM first, SIGKILL after
# `grace`. Quiet for 1 s ends the watch when the command left nothing; once something was ended, 5 s.
first, quiet, deadline = {}, 0, time.time() + 120
while time.time() < deadline and quiet < (20 if first else 4):
    procs = table()
    roots = {pid for pid in procs if carries_marker(pid)} | orphans(procs)
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
    argv = [sys.executable, "-c", _WATCHDOG, marker, str(grace_s), MARK, str(os.getpgid(0))]
    _watchdog = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=env, start_new_session=True, close_fds=True)
    os.environ[MARK] = marker
