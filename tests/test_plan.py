"""Where a trial's config is decided: ``Study.plan`` -> ``TrialPlan`` (studies/plan.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moue.counting import count
from moue.errors import ConfigError
from moue.tracking_contract import CONFIG_PARAM
from moue.trial_config import CONVERTED_IN_TRIAL, TrialConfig
from moue.studies.spec import load_study

ROOT = Path(__file__).resolve().parent.parent


def test_grid_plans_follow_the_precedence_and_are_resolved_once() -> None:
    study = load_study(ROOT / "studies" / "vw_grid.toml")
    assert len(study.plans) == len(study.points) == 18
    for point, plan in zip(study.points, study.plans, strict=True):
        cfg = plan.config
        assert isinstance(cfg, TrialConfig) and plan.point == point
        # fixed < point < budget < placement
        assert cfg.model.d_model == point.get("model.d_model", study.fixed["model.d_model"])
        assert cfg.model.pool_size == point["model.pool_size"] and cfg.train.seed == point["train.seed"]
        assert cfg.train.lr == study.fixed["train.lr"]
        assert cfg.train.tokens == study.budget_tokens == plan.tokens
        assert cfg.train.eval_every_tokens == study.eval_every(study.budget_tokens)
        assert cfg.train.threads == int(study.resources.cpus)
        assert plan.counts == count(cfg.model, seq_len=cfg.train.seq_len)
        assert plan.compute == plan.counts.flops_per_token * cfg.train.tokens
    assert study.plan({"point": study.points[3]}) == study.plans[3]  # the same function everywhere


def test_params_carry_the_typed_config_once_more_as_json() -> None:
    plan = load_study(ROOT / "studies" / "vw_grid.toml").plans[0]
    params = plan.params
    typed = json.loads(params[CONFIG_PARAM])
    assert typed == {k: v for k, v in params.items() if k != CONFIG_PARAM}
    assert typed["model.pool_size"] == plan.config.model.pool_size and isinstance(typed["model.pool_size"], int)
    assert isinstance(typed["train.lr"], float) and typed["data.vocab_size"] is None
    assert typed["derived.n_params_active"] == plan.counts.n_params_active
    assert plan.tags == {"moue.seed": str(plan.config.train.seed)}
    m = plan.config.model
    assert typed["family"] == "layerwise" and plan.run_name == (
        f"moue layerwise d{m.d_model} L{m.n_layers} P{m.pool_size} w{m.window} s{m.stride} k{m.top_k} "
        f"{m.router} seed{plan.config.train.seed}")
    study = load_study(ROOT / "studies" / "vw_grid.toml")
    assert {p.params["family"] for p in study.plans} == {"layerwise", "unipool", "rotational"}
    assert TrialConfig.from_dict({k: v for k, v in typed.items()
                                  if k.split(".")[0] in ("model", "train", "data")}) == plan.config


def test_conversion_plans_carry_their_source_and_resolve_in_the_worker(tmp_path) -> None:
    study = load_study(ROOT / "studies" / "conversion.toml")
    converted = [p for p in study.plans if p.config.convert is not None]
    assert converted and all(p.config.train.init_from == "" for p in converted)
    plan = converted[0]
    assert plan.params["train.init_from"] == CONVERTED_IN_TRIAL
    assert plan.params["convert.router_init"] == plan.config.convert.router_init
    ckpt = tmp_path / "converted.pt"
    ckpt.write_bytes(b"")
    resolved = plan.config.resolved(str(ckpt))
    assert resolved.train.init_from == str(ckpt) and resolved.model == plan.config.model


def test_a_plan_with_a_bad_setting_is_a_config_error() -> None:
    study = load_study(ROOT / "studies" / "vw_grid.toml")
    with pytest.raises(ConfigError) as err:
        study.plan({"point": {**study.points[0], "train.seq_len": 128, "train.batch_tokens": 4096}})
    assert err.value.field == "train.seq_len"
    with pytest.raises(ConfigError) as err:
        study.plan({"point": {**study.points[0], "convert.router_init": "random"}})
    assert str(err.value) == "convert.router_init ('random') must be one of zero, copy"
