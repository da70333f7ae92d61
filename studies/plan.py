"""Where a trial's config is decided: a study and one point -> a ``TrialPlan``, resolved once.

Precedence of a trial's settings (later wins): the configs' own defaults < the spec's ``[fixed.*]``
(``[smoke.*]`` under ``--smoke``) < the point (a grid point, or what the sampler suggested and the
space's ``define`` derived) < the study's budget (``train.tokens``, the report marks) < what the
placement fills in when the spec left it unset (``train.threads`` = the trial's CPUs, a GPU
share's memory cap). The result is validated once, as a ``TrialConfig``, and everything that
follows reads the plan: ``--dry-run`` prints it, the MLflow callback logs its ``params`` and
``tags``, the Ray worker trains its ``config``. A conversion trial's plan carries
``config.convert`` (where its weights come from); the worker writes that checkpoint and trains
``config.resolved(path)``.

Pure Python: no torch, Ray or MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moue.counting import Counts, count
from moue.topology import family
from moue.tracking_contract import CONFIG_PARAM, SEED
from moue.trial_config import TrialConfig

__all__ = ["TrialPlan", "plan_trial", "resolve_trial", "trial_point", "trial_params", "model_family"]


@dataclass(frozen=True, kw_only=True)
class TrialPlan:
    """One trial of a study, resolved: what it trains, what it logs, how it is tagged."""

    point: Mapping[str, Any]  # the searched settings (seeds included): what sets this trial apart
    config: TrialConfig  # validated; the only thing the worker trains from
    counts: Counts  # parameter counts, virtual width and compute (``moue.counting``)

    @property
    def params(self) -> dict[str, Any]:
        """The MLflow params: the resolved config, the counting convention, the derived counts, and
        all of them as typed JSON (``CONFIG_PARAM``). Built when asked (a grid of 10,000 plans
        travels to every worker; its params need not)."""
        return trial_params(self.config, self.counts)

    @property
    def tags(self) -> dict[str, str]:
        """The trial run's tags at creation."""
        return {SEED: str(self.config.train.seed)}

    @property
    def run_name(self) -> str:
        """A readable MLflow run name: family, size, topology, router, seed (the trial id is a tag)."""
        m = self.config.model
        return (f"moue {model_family(self.config)} d{m.d_model} L{m.n_layers} P{m.pool_size} w{m.window} "
                f"s{m.stride} k{m.top_k} {m.router} seed{self.config.train.seed}")

    @property
    def tokens(self) -> int:
        return self.config.train.tokens

    @property
    def compute(self) -> int:
        """Training FLOPs of the whole budget (the counting convention's ``flops_per_token * tokens``)."""
        return self.counts.compute(self.tokens)


def trial_point(study, config: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's config of one trial (``{"point": {...}}`` for grids, the sampler's flat suggestion
    otherwise) -> the trial's searched settings, seeds included."""
    point = dict(config.get("point", {}))
    # Optuna's own search coordinates (``space.*``) are not settings: the space's define returned
    # the point they map to
    point.update({k: v for k, v in config.items() if k != "point" and not k.startswith("space.")})
    if study.search.algorithm != "grid":
        seed = study.search.seeds[0]
        point.setdefault("train.seed", seed)
        point.setdefault("data.seed", seed)
    return point


def resolve_trial(study, config: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's config of one trial -> its full flat settings, in the precedence of the module docstring."""
    flat = study.trial_flat(trial_point(study, config))
    flat.setdefault("train.threads", max(1, int(study.resources.cpus)))
    if 0 < study.resources.gpu < 1:  # a fractional GPU share is also a memory cap
        flat.setdefault("train.gpu_memory_fraction", study.resources.gpu)
    return flat


def model_family(cfg: TrialConfig) -> str:
    """``dense``, ``layerwise`` (private windows), ``unipool`` (one shared pool) or ``rotational``."""
    m = cfg.model
    return "dense" if m.ffn == "dense" else family(m.n_moe_layers, m.pool_size, m.window, m.stride)


def trial_params(cfg: TrialConfig, counts: Counts) -> dict[str, Any]:
    """The params of a trial run: the full resolved config (defaults included), the counting
    convention and the derived counts, and all of them once more as typed JSON (``CONFIG_PARAM``)."""
    params = cfg.to_flat()
    params.update(counts.as_params())
    params["family"] = model_family(cfg)
    params[CONFIG_PARAM] = json.dumps(params, sort_keys=True)
    return params


def plan_trial(study, config: Mapping[str, Any]) -> TrialPlan:
    """The plan of the trial Tune configured with ``config`` (raises ``ConfigError``)."""
    flat = resolve_trial(study, config)
    cfg = TrialConfig.from_dict(flat)
    counts = count(cfg.model, seq_len=cfg.train.seq_len)
    return TrialPlan(point=trial_point(study, config), config=cfg, counts=counts)
