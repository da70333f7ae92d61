"""Trial configs from files and overrides; checkpoints on disk.

A trial file is TOML with ``[model]``, ``[train]`` and ``[data]`` tables (``studies/trials/``);
``--set key=value`` overrides use dotted keys (``model.pool_size=32``), the value read as a TOML
value (``3e-3``, ``true``, ``"norm"``) or, failing that, as a bare string (``model.router=norm``).
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch

from moue.errors import ConfigError
from moue.train import TrialConfig

__all__ = ["parse_override", "load_trial", "save_checkpoint", "load_checkpoint"]


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", text, "must look like section.key=value, e.g. model.pool_size=32")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def load_trial(path: str | Path | None, overrides: list[str] = ()) -> TrialConfig:
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config", str(path), "must be an existing TOML file")
        try:
            values = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", str(path), f"is not valid TOML: {exc}") from None
        for key, value in values.items():
            if key not in ("model", "train", "data") or not isinstance(value, dict):
                raise ConfigError(key, value, "is not a trial section; allowed tables: model, train, data")
    flat = {f"{section}.{k}": v for section, table in values.items() for k, v in table.items()}
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
    return TrialConfig.from_dict(flat)


def save_checkpoint(path: str | Path, blob: dict) -> None:
    """Write atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True``: tensors and plain containers only, never arbitrary pickles."""
    return torch.load(path, map_location="cpu", weights_only=True)
