"""The Ray cluster a sweep runs on, and the trust boundary of its saved state.

A local sweep starts its *own* cluster (never one somebody else started on the machine) and keeps
it unreachable from other hosts:

- **Loopback only.** Ray 2.60 "resolves" a requested ``127.0.0.1`` node address to the host's
  reachable address (for multi-node clusters) and its gRPC servers then listen on every interface.
  Ray's single-host mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and
  Windows) keeps the node address and every listening socket on loopback; we turn it on for local
  clusters on every platform.
- **Token authentication.** ``RAY_AUTH_MODE=token`` with a random token generated per workspace
  (``<workspace>/ray_auth_token``, mode 0600), so other users of the same host cannot submit work
  to the cluster over loopback either. A user who sets ``RAY_AUTH_MODE`` (or ``RAY_AUTH_TOKEN`` /
  ``RAY_AUTH_TOKEN_PATH``) explicitly keeps their choice.

Joining a cluster (``--address``) changes nothing in the environment: that cluster's operator
decides how it is secured (``RAY_AUTH_MODE=token`` and the cluster's token on the driver).

``--resume`` makes Ray Tune unpickle the sweep's saved state (``tuner.pkl``, the searcher's
state, the trainable): whoever can write that state can run code as the user who resumes it.
``check_state_trust`` refuses state that another user owns or that anyone may write.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

from moue.errors import ConfigError

__all__ = ["TOKEN_FILE", "ensure_token", "local_cluster_env", "ray_init", "check_state_trust"]

TOKEN_FILE = "ray_auth_token"
SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node address and sockets on loopback


def ensure_token(path: Path) -> Path:
    """The workspace's Ray token file: created (random, 0600) when missing, refused when others can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError("ray token", str(path), "must be owned by you and readable by no one else "
                              f"(mode {stat.filemode(st.st_mode)}, uid {st.st_uid}); remove it to get a new one") from None
        if not path.read_text().strip():
            raise ConfigError("ray token", str(path), "is empty; remove it to get a new one")
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def local_cluster_env(root: Path) -> dict[str, str]:
    """The environment a local cluster starts with (explicit user settings of auth are kept)."""
    env = {SINGLE_HOST_ENV: "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    if env["RAY_AUTH_MODE"] == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                 or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_TOKEN_PATH"] = str(ensure_token(root / TOKEN_FILE))
    return env


def _apply(env: dict[str, str]) -> None:
    """Put ``env`` into this process (and so every Ray process it starts), refreshing what Ray
    read at import time: its single-host switch and its auth config."""
    os.environ.update(env)
    if "ray" in sys.modules:
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader, Config

        if SINGLE_HOST_ENV in env:
            ray_constants.ENABLE_RAY_CLUSTER = env[SINGLE_HOST_ENV] != "0"
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def ray_init(address: str | None, root: Path) -> None:
    """Connect to ``address``, or start this sweep's own loopback, token-authenticated cluster."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune's newer output engine prints its experiment banner, results path and a TensorBoard hint
    # even at verbose=0; the legacy engine at verbose=0 is silent, and our progress line and
    # summary say the same things (the Tune state directory included)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not address:
        _apply(local_cluster_env(root))
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if k in os.environ}
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False, runtime_env={"env_vars": env})
    else:
        # address="local": a new cluster even when `ray start` left one on the machine (or RAY_ADDRESS is set)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})


def _untrusted(path: Path, st: os.stat_result) -> str | None:
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not you (uid {os.getuid()})"
    if st.st_mode & stat.S_IWOTH and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"is writable by every user (mode {stat.filemode(st.st_mode)})"
    return None


def check_state_trust(exp_dir: str) -> None:
    """Refuse to resume (unpickle) sweep state another user owns or anyone may write.

    Checks the experiment directory, everything under it, and the directory holding it. Remote
    storage (``s3://...``) cannot be checked here: its access policy is the boundary.
    """
    if "://" in exp_dir:
        return
    root = Path(exp_dir)
    paths = [root.parent, root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(Path(dirpath) / n for n in dirnames + filenames)
    for path in paths:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        reason = _untrusted(path, st)
        if reason:
            raise ConfigError("--resume", str(path), f"{reason}; resuming unpickles the sweep state, so who can "
                              "write it can run code as you: fix its owner/permissions or start a new sweep")
