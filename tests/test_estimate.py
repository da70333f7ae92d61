"""The dry run's wall-time estimate (studies/estimate.py): the per-token cost line through two
timed models, each trial's token equivalents, and the schedule on the sweep's slots."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moue.studies.estimate import STARTUP_S, estimate_sweep, step_cost


def _plan(f, tokens, cooldown_at=(), val=3000, batch=1000):
    train = SimpleNamespace(tokens=tokens, batch_tokens=batch, cooldown_at=cooldown_at, cooldown_frac=0.2)
    return SimpleNamespace(counts=SimpleNamespace(flops_per_token=f),
                           config=SimpleNamespace(train=train, data=SimpleNamespace(val_tokens=val), f=f))


def test_the_cost_line_through_two_models_and_the_schedule():
    c0, rate = 2e-5, 1e10  # the machine the fake cost describes
    timed = []

    def cost(cfg):
        timed.append(cfg.f)
        return c0 + cfg.f / rate

    plans = [_plan(1e5, 100_000), _plan(4e5, 300_000, cooldown_at=(100_000,)), _plan(2e5, 200_000)]
    est = estimate_sweep(plans, concurrency=2, marks=4, cost=cost)
    assert sorted(timed) == [1e5, 4e5]  # only the smallest and the largest model are timed
    assert est.c0 == pytest.approx(c0) and est.rate == pytest.approx(rate)
    # tokens + the branch's 20 steps + (marks + 1 + branches) evaluations at a third of a token
    want = [100_000 + 5 * 1000, 300_000 + 20_000 + 6 * 1000, 200_000 + 5 * 1000]
    for s, w, p in zip(est.trial_s, want, plans, strict=True):
        assert s == pytest.approx(STARTUP_S + w * (c0 + p.counts.flops_per_token / rate))
    a, b, c = est.trial_s  # slot 1: a then c (a ends first), slot 2: b
    assert est.wall_s == pytest.approx(max(a + c, b)) and est.concurrency == 2
    one = estimate_sweep(plans, concurrency=1, marks=4, cost=cost)
    assert one.wall_s == pytest.approx(sum(est.trial_s))
    assert "estimated wall time: ~" in est.line() and "on 2 slots" in est.line()


def test_a_real_step_is_timed():
    from moue import TrialConfig

    cfg = TrialConfig.from_dict({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                                           "pool_size": 4, "window": 2, "stride": 2, "top_k": 1,
                                           "expert_hidden": 16},
                                 "train": {"batch_tokens": 512, "seq_len": 32, "threads": 1}})
    s = step_cost(cfg, steps=2)
    assert 1e-8 < s < 1e-2
