"""Which points are possible: ``check_point`` and ``prune``, before anything is launched.

A point is a dict of flat dotted overrides (``{"model.pool_size": 32, "model.window": 8}``) applied
on top of a study's fixed settings. ``check_point(flat)`` takes the merged dict and returns ``None``
or one line saying why it cannot run: whatever ``ModelConfig`` rejects (``top_k <= window <=
pool_size``, the stride range, ...; MODEL.md section 1), an expert no layer can reach (search spaces
always reject these: a dead expert skews every parameter-matched comparison), and the training
combinations ``TrialConfig`` would reject (context longer than the RoPE table, a budget shorter than
one step, widening without a window to widen).

Defaults are read from the dataclasses, never copied: ``ModelConfig`` directly (pure Python), and
``TrainConfig`` from the source of ``moue_core/train.py`` (importing that module imports torch,
which search spaces must not do), so a changed default there is a changed default here.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import warnings
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from moue_core.config import ModelConfig
from moue_core.errors import ConfigError
from moue_core.topology import Topology

__all__ = ["check_point", "prune", "model_config", "model_value", "train_defaults", "train_value",
           "reaching_stride", "SECTIONS", "CONVERT_OPTIONS"]

SECTIONS = ("model", "train", "data", "convert")
CONVERT_OPTIONS = {"router_init": ("zero", "copy")}  # moue_core.convert.convert_layerwise
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


@lru_cache(maxsize=1)
def train_defaults() -> dict[str, Any]:
    """``TrainConfig``'s field defaults, read from the source of ``moue_core/train.py``.

    Every default there is a literal; one that is not (or a missing class) is a loud error here,
    not a silently wrong number."""
    spec = importlib.util.find_spec("moue_core.train")
    if spec is None or spec.origin is None:
        raise RuntimeError("moue_core.train not found: cannot read TrainConfig's defaults")
    with open(spec.origin, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=spec.origin)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainConfig":
            out = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if item.value is None:
                        raise RuntimeError(f"TrainConfig.{item.target.id} has no default")
                    out[item.target.id] = ast.literal_eval(item.value)
            return out
    raise RuntimeError(f"no class TrainConfig in {spec.origin}")


def model_value(flat: Mapping[str, Any], name: str) -> Any:
    """``model.<name>`` from ``flat``, else ``ModelConfig``'s default."""
    return flat.get(f"model.{name}", _MODEL_DEFAULTS[name])


def train_value(flat: Mapping[str, Any], name: str) -> Any:
    """``train.<name>`` from ``flat``, else ``TrainConfig``'s default."""
    return flat.get(f"train.{name}", train_defaults()[name])


def model_config(flat: Mapping[str, Any], *, require_reachable: bool | None = None) -> ModelConfig:
    """``ModelConfig.from_dict`` of the ``model.*`` keys of ``flat`` (raises ``ConfigError``).

    ``require_reachable=None`` keeps the config's own setting, and then an unreachable expert only
    warns; ``True`` makes it an error; ``False`` builds quietly (counting only; validity is
    ``check_point``'s job)."""
    values = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    if require_reachable:
        values["require_reachable"] = True
    if require_reachable is False:
        with warnings.catch_warnings():  # the unreachable-expert warning, for a count only
            warnings.simplefilter("ignore", UserWarning)
            return ModelConfig.from_dict(values)
    return ModelConfig.from_dict(values)


def check_point(flat: Mapping[str, Any]) -> str | None:
    """``None`` if the merged settings ``flat`` (fixed + point) can run, else one line saying why."""
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head not in SECTIONS or not rest:
            return f"{key} ({value!r}) is not a setting; use {', '.join(s + '.*' for s in SECTIONS)}"
    try:
        cfg = model_config(flat, require_reachable=True)
    except ConfigError as err:
        return str(err)
    defaults = train_defaults()
    for key, value in flat.items():
        if key.startswith("train.") and key[len("train."):] not in defaults:
            return f"{key} ({value!r}) is not a train setting; allowed: {', '.join(sorted(defaults))}"
    sizes = {}
    for name in ("tokens", "batch_tokens", "seq_len", "widen_tokens"):
        v = train_value(flat, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"train.{name} ({v!r}) must be an integer >= 0"
        sizes[name] = v
    if sizes["seq_len"] > cfg.max_seq_len:
        return f"train.seq_len ({sizes['seq_len']}) must be <= model.max_seq_len ({cfg.max_seq_len})"
    if sizes["seq_len"] < 1 or sizes["batch_tokens"] % sizes["seq_len"]:
        return f"train.batch_tokens ({sizes['batch_tokens']}) must be a multiple of train.seq_len ({sizes['seq_len']})"
    if sizes["tokens"] < max(1, sizes["batch_tokens"]):
        return (f"train.tokens ({sizes['tokens']}) must be at least one step "
                f"(train.batch_tokens = {sizes['batch_tokens']})")
    if sizes["widen_tokens"]:
        if sizes["widen_tokens"] > sizes["tokens"]:
            return f"train.widen_tokens ({sizes['widen_tokens']}) must be <= train.tokens ({sizes['tokens']})"
        if cfg.ffn != "moe" or cfg.window <= cfg.top_k:
            return f"train.widen_tokens ({sizes['widen_tokens']}) needs a window to widen (model.window > model.top_k)"
    for key, value in flat.items():
        if key.startswith("convert."):
            name = key[len("convert."):]
            if name not in CONVERT_OPTIONS:
                return f"{key} ({value!r}) is not a conversion setting; allowed: {', '.join(sorted(CONVERT_OPTIONS))}"
            if value not in CONVERT_OPTIONS[name]:
                return f"{key} ({value!r}) must be one of {', '.join(CONVERT_OPTIONS[name])}"
    return None


def prune(points: Iterable[Mapping[str, Any]], fixed: Mapping[str, Any]
          ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Split ``points`` into those that can run on top of ``fixed`` and ``(point, reason)`` pairs."""
    kept: list[dict[str, Any]] = []
    pruned: list[tuple[dict[str, Any], str]] = []
    for point in points:
        reason = check_point({**fixed, **point})
        if reason:
            pruned.append((dict(point), reason))
        else:
            kept.append(dict(point))
    return kept, pruned


def reaching_stride(*, n_layers: int, pool_size: int, window: int, stride: int, group: int = 1) -> int | None:
    """The smallest stride ``>= stride`` (and ``< pool_size``) with every expert in some window.

    ``stride`` itself when it already reaches them all; ``None`` when none does (``L*w < P``).
    Used where a derived topology would otherwise leave dead experts (shallow depth, a sampled
    overlap); the point carries the stride actually used, so counts stay honest."""
    if window >= pool_size:
        return stride
    for s in range(max(stride, 1), pool_size):
        topo = Topology(n_layers=n_layers, pool_size=pool_size, window=window, stride=s, group=group)
        if topo.unreachable == 0:
            return s
    return None
