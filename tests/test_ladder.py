"""The ``ladder`` space (one size dial, the rest derived) and the LR rule of its LR stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import moue.search_spaces as ss
from moue.analysis.lr_rule import fit_lr_rule
from moue import ConfigError

FIXED = {"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4, "model.max_seq_len": 64, "model.top_k": 2,
         "model.expert_hidden": 64, "model.router_state_dim": 16, "train.seq_len": 64, "train.batch_tokens": 4096,
         "train.lr": 3e-3, "train.tokens": 1_000_000}
LADDER = ss.get_space("ladder")


def test_each_size_derives_its_settings_from_the_dial():
    points = LADDER.grid(FIXED, {"sizes": [32, 64, 128], "lr_rule": "power", "lr_exponent": 0.5,
                                 "families": ["layerwise"]})
    assert [p["model.d_model"] for p in points] == [32, 64, 128]
    n0 = ss.active_params({**FIXED, **points[0]})
    for p in points:
        flat = {**FIXED, **p}
        d, n = p["model.d_model"], ss.active_params(flat)
        assert p["model.n_heads"] == d // 16 and p["model.expert_hidden"] == d  # the study's f/d = 1
        assert p["model.router_state_dim"] == d // 4
        assert abs(p["train.tokens"] - 20 * n) <= 4096 and p["train.tokens"] % 4096 == 0
        assert p["train.warmup_frac"] == pytest.approx(min(0.2, n / p["train.tokens"]), abs=1e-4)
        assert p["train.lr"] == pytest.approx(3e-3 * (n / n0) ** -0.5, rel=1e-3)
        assert ss.check_point(flat) is None


def test_families_are_iso_active_at_every_size_and_other_dials():
    points = LADDER.grid(FIXED, {"sizes": [64, 96], "families": ["layerwise", "moue"], "active_tol": 0.05})
    by_d = {}
    for p in points:
        by_d.setdefault(p["model.d_model"], []).append(ss.active_params({**FIXED, **p}))
    for counts in by_d.values():
        assert len(counts) == 2 and abs(counts[0] - counts[1]) <= 0.05 * counts[0]
    deep = LADDER.grid(FIXED, {"dial": "n_layers", "sizes": [2, 4, 8], "families": ["layerwise"]})
    assert [p["model.n_layers"] for p in deep] == [2, 4, 8] and {p["model.d_model"] for p in deep} == {64}
    target = 200_000
    (p,) = LADDER.grid(FIXED, {"dial": "active_params", "sizes": [target], "families": ["layerwise"]})
    near = ss.active_params({**FIXED, **p})
    for d in (p["model.d_model"] - 16, p["model.d_model"] + 16):  # no other width is closer
        other = LADDER.grid(FIXED, {"dial": "d_model", "sizes": [d], "families": ["layerwise"]})[0]
        assert abs(ss.active_params({**FIXED, **other}) - target) >= abs(near - target)


def test_the_lr_stage_and_a_rule_file(tmp_path):
    scan = LADDER.grid(FIXED, {"sizes": [32, 64], "lr_scan": [0.5, 1.0, 2.0], "families": ["layerwise"]})
    assert len(scan) == 6
    lrs = sorted(p["train.lr"] for p in scan if p["model.d_model"] == 32)
    assert lrs == pytest.approx([1.5e-3, 3e-3, 6e-3])
    n = ss.active_params({**FIXED, **scan[0]})
    assert scan[0]["train.tokens"] == max(4096, round(5 * n / 4096) * 4096)  # short: 5 tokens per parameter
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"c": 2.0, "exponent": 0.5}))
    (p,) = LADDER.grid(FIXED, {"sizes": [64], "lr_rule": str(rule), "families": ["layerwise"]})
    assert p["train.lr"] == pytest.approx(2.0 * ss.active_params({**FIXED, **p}) ** -0.5, rel=1e-3)
    with pytest.raises(ConfigError, match="space.lr_rule"):
        LADDER.options({"sizes": [64], "lr_rule": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="space.sizes"):
        LADDER.options({"sizes": []})


def test_lr_rule_recovers_a_power_law_and_flags_edges():
    c, e = 0.5, 0.3
    rows = []
    for n in (1e4, 3e4, 1e5, 3e5, 1e6):
        opt = c * n ** -e
        for m in (0.25, 0.5, 1, 2, 4):
            rows.append((n, opt * m, 2.0 + 0.1 * math.log(m) ** 2))
    n, lr, loss = (np.array(v) for v in zip(*rows))
    rule = fit_lr_rule(n, lr, loss, bootstrap=100)
    assert rule.exponent == pytest.approx(e, abs=1e-6) and rule.c == pytest.approx(c, rel=1e-5)
    assert rule.identified and rule.lr(1e5) == pytest.approx(c * 1e5 ** -e)
    from moue.analysis.figures import lr_rule_data

    fig = lr_rule_data(rule)
    assert len(fig.points) == 6 and fig.points[-1].x == pytest.approx([c * n ** -e for n in (1e4, 3e4, 1e5, 3e5, 1e6)])
    # the true optimum 20x above the scanned LRs at every size: each vertex is outside the scan
    shifted = [(a, b, 2.0 + 0.1 * math.log(b / (20 * c * a ** -e)) ** 2) for a, b, _ in rows]
    n, lr, loss = (np.array(v) for v in zip(*shifted))
    edged = fit_lr_rule(n, lr, loss, bootstrap=20)
    assert any("edge" in s["flags"] for s in edged.sizes) and not edged.identified
    for s in edged.sizes:  # an edge size's optimum is its best scanned LR, never the extrapolated vertex
        if "edge" in s["flags"]:
            assert s["lr_opt"] == max(s["lrs"]) and s["loss_opt"] == min(s["losses"])
    # a vertex inside the scan but the lowest loss at its largest LR (an asymmetric curve, as the
    # ladder's d = 48 scan): not bracketed, so an edge
    lrs = np.array([0.000613, 0.00123, 0.00245, 0.00491, 0.00981])
    losses = np.array([3.862, 3.190, 2.771, 2.683, 2.628])
    one = fit_lr_rule(np.r_[np.full(5, 4.67e4), np.full(5, 9e4)], np.r_[lrs, lrs / 2],
                      np.r_[losses, [3.5, 3.0, 2.6, 2.5, 2.55]], bootstrap=10)
    assert one.sizes[0]["flags"] == ["edge"] and one.sizes[0]["lr_opt"] == pytest.approx(0.00981)
    assert one.sizes[1]["flags"] == [] and lrs[2] / 2 < one.sizes[1]["lr_opt"] < lrs[4] / 2


def test_cooldown_branches_at_fractions_of_each_size(tmp_path):
    fixed = {**FIXED, "train.schedule": "wsd"}
    for p in LADDER.grid(fixed, {"sizes": [32, 64], "cooldowns": [0.25, 0.5], "families": ["layerwise"]}):
        t = p["train.tokens"]
        assert p["train.cooldown_at"] == [round(0.25 * t / 4096) * 4096, round(0.5 * t / 4096) * 4096]
        assert ss.check_point({**fixed, **p}) is None


def test_an_isoflop_design_puts_a_branch_of_every_eligible_size_on_each_budget():
    """``isoflop_budgets``: each size trains to its largest eligible budget and forks branches that
    end (fork + round(cooldown_frac * steps) batches, as the trainer runs them) within a batch of
    each smaller one; sizes outside ``isoflop_tpp`` at a budget skip it, and a size with no budget
    is pruned with the reason."""
    from moue import TrialConfig
    from moue.counting import count
    from moue.search_spaces.constraints import model_config

    fixed = {**FIXED, "model.n_layers": 2, "train.schedule": "wsd", "train.cooldown_frac": 0.2}
    budgets, tpp = [3e11, 1e12, 3e12], [2.0, 250.0]
    opts = {"sizes": [32, 48, 64, 96, 128, 256], "families": ["layerwise"], "tokens_per_param": 0.0,
            "isoflop_budgets": budgets, "isoflop_tpp": tpp}
    cands = LADDER.candidates(fixed, LADDER.options(opts))
    pruned = [why for p, why in cands if why]
    assert len(pruned) == 1 and "no IsoFLOP budget within [2.0, 250.0]" in pruned[0]  # d 256: under 2 tpp
    points = [p for p, why in cands if not why]
    on_budget: dict[float, list[int]] = {c: [] for c in budgets}
    for p in points:
        flat = {**fixed, **p}
        c = count(model_config(flat, require_reachable=False), seq_len=64)
        n, f = c.n_params_active, c.flops_per_token
        ends = [p["train.tokens"]] + [t + round(0.2 * t / 4096) * 4096 for t in p.get("train.cooldown_at", [])]
        eligible = [b for b in budgets if tpp[0] <= b / f / n <= tpp[1]]
        assert eligible and p["train.tokens"] == pytest.approx(max(eligible) / f, abs=4096)
        for b in eligible:  # every eligible budget is reached by the run or one of its branches
            assert min(abs(e * f - b) for e in ends) <= 4096 * f, (p["model.d_model"], b)
            on_budget[b].append(p["model.d_model"])
        assert len(ends) == len(eligible)  # and no other branch
        cfg = {"model": {k[6:]: v for k, v in flat.items() if k.startswith("model.")},
               "train": {k[6:]: v for k, v in flat.items() if k.startswith("train.")}}
        TrialConfig.from_dict(cfg)  # the forks are in the stable phase
    assert all(len(sizes) >= 3 for sizes in on_budget.values()), on_budget
    with pytest.raises(ConfigError, match="space.isoflop_tpp"):
        LADDER.grid(fixed, {**opts, "isoflop_tpp": [5.0, 2.0]})
