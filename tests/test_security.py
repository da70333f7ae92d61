"""Security of local sweeps: their own cluster, loopback only, token authentication; and the
trust boundary of `--resume` (Tune unpickles the saved sweep state)."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import kill_marked, launched, marked_env, marked_pids

from moue.errors import ConfigError
from moue.studies.cluster import SINGLE_HOST_ENV, TOKEN_FILE, check_state_trust, ensure_token

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "studies" / "smoke.toml"


def _host_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses (where another host would connect)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if ":" not in a and not ipaddress.ip_address(a).is_loopback]


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(local address, port, process name) of every TCP socket the given processes listen on (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        local = fields[3]
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                host, _, port = local.rpartition(":")
                found.append((host.strip("[]"), int(port), name))
                break
    return found


def _is_loopback(host: str) -> bool:
    host = host.removeprefix("::ffff:")
    return host not in ("*", "0.0.0.0", "::") and ipaddress.ip_address(host).is_loopback


def _ray_status(gcs: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "status", f"--address={gcs}"],
                          env=env, capture_output=True, text=True, timeout=90)


def _spec(tmp_path: Path) -> Path:
    text = SMOKE.read_text().replace("tokens = 4096\nmarks = 4", "tokens = 4_000_000\nmarks = 4")
    text = text.replace('kind = "asha"', 'kind = "none"')
    path = tmp_path / "smoke.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_local_sweep_own_cluster_loopback_only_and_token_required(tmp_path) -> None:
    """A plain local sweep, with somebody else's `ray start --head` on the machine: it starts its
    own cluster (no crash), every port it listens on is on loopback (a connection to this host's
    network address is refused), and its GCS refuses a client without the workspace's token."""
    other_mark, other_env = marked_env()
    # somebody else's cluster (kept on loopback here: a test exposes nothing either)
    other_env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    ws = tmp_path / "ws"
    sweep = None
    try:
        other = subprocess.run(["ray", "start", "--head", "--num-cpus=1", "--include-dashboard=false",
                                "--disable-usage-stats"], env=other_env, capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr
        sweep = subprocess.Popen([sys.executable, "-c", "from moue.studies.cli import main; main()", "sweep",
                                  str(_spec(tmp_path)), "--workspace", str(ws)], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def trial_workers():  # the cluster is up and trials run in their workers
            if sweep.poll() is not None:
                raise AssertionError(f"the sweep ended early:\n{sweep.stdout.read()}")
            socks = _listening(set(marked_pids(mark)))
            names = {n for _, _, n in socks}
            return socks if "gcs_server" in names and "raylet" in names and any(
                n.startswith("ray::") and "RuntimeEnv" not in n for n in names) else None

        end = time.time() + 240
        while not (socks := trial_workers()):
            assert time.time() < end, "timed out waiting for the sweep's cluster"
            time.sleep(1)
        time.sleep(2)
        socks = _listening(set(marked_pids(mark)))
        exposed = [s for s in socks if not _is_loopback(s[0])]
        assert not exposed, f"listening beyond loopback: {exposed}"
        for address in _host_addresses():
            for _, port, name in socks:
                with pytest.raises(OSError):
                    socket.create_connection((address, port), timeout=3).close()

        gcs_port = next(port for _, port, name in socks if name == "gcs_server")
        other_ports = {port for _, port, _ in _listening(set(marked_pids(other_mark)))}
        assert gcs_port not in other_ports, "the sweep joined the other cluster"
        gcs = f"127.0.0.1:{gcs_port}"
        token = ws / TOKEN_FILE
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        # a client on this host must not "resolve" 127.0.0.1 to the host's address either
        base = {**{k: v for k, v in env.items() if not k.startswith("MOUE_TEST")}, SINGLE_HOST_ENV: "0"}
        for extra in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
            refused = _ray_status(gcs, {**base, **extra})
            assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stdout + refused.stderr
        for attempt in range(3):  # a loaded machine can time a client out; the token must be enough
            ok = _ray_status(gcs, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
            if ok.returncode == 0 or "Timed out" not in ok.stderr:
                break
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        if sweep is not None and sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        kill_marked(mark)
        kill_marked(other_mark)
    assert not marked_pids(mark) and not marked_pids(other_mark)


def test_token_file_is_private_and_refused_when_others_can_read_it(tmp_path) -> None:
    path = ensure_token(tmp_path / TOKEN_FILE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    first = path.read_text()
    assert ensure_token(path).read_text() == first, "an existing token is kept"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by no one else"):
        ensure_token(path)


def _fake_state(root: Path) -> Path:
    exp = root / "ray" / "sweep"
    (exp / "trial_0").mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"\x80\x04N.")
    (exp / "experiment_state-2026.json").write_text("{}")
    (exp / "trial_0" / "params.pkl").write_bytes(b"\x80\x04N.")
    return exp


def test_resume_state_trust(tmp_path) -> None:
    exp = _fake_state(tmp_path)
    check_state_trust(str(exp))  # own files, private: accepted
    victim = exp / "trial_0" / "params.pkl"
    victim.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by every user"):
        check_state_trust(str(exp))
    victim.chmod(0o644)
    check_state_trust(str(exp))
    if os.getuid() == 0:  # root can hand a file to another user
        os.chown(exp / "tuner.pkl", 65534, 65534)
        with pytest.raises(ConfigError, match="owned by uid 65534"):
            check_state_trust(str(exp))


def test_resume_of_world_writable_state_exits_2_before_launch(tmp_path) -> None:
    """The CLI refuses (exit 2, one line) before Tune unpickles anything or Ray starts."""
    ws = tmp_path / "ws"
    exp = ws / "ray" / "smoke"
    exp.mkdir(parents=True)
    # the state Tune.can_restore looks for, as a sweep leaves it
    (exp / "experiment_state-2026-12-01_00-00-00.json").write_text("{}")
    (exp / "tuner.pkl").write_bytes(b"\x80\x04N.")
    (exp / "tuner.pkl").chmod(0o666)
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", "sweep", str(SMOKE),
                           "--workspace", str(ws), "--resume"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tuner.pkl" in lines[0] and "writable by every user" in lines[0], proc.stderr
    assert not launched(mark), "no cluster was started"
