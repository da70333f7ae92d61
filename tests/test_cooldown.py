"""Cooldown branches of a warm-up-stable-decay trial (issue 13, a cheap data axis): each branch is
the run a separate WSD trial of its length would be, the main run is untouched, branches resume,
and the loader turns them into (N, D) points."""

from __future__ import annotations

import math

import polars as pl
import pytest

from moue.analysis.loading import with_cooldown_points
from moue import ConfigError, TrialConfig
from moue.tracking_contract import is_tracked
from moue.train import NullSink, train
from moue.trial_config import TrainConfig, cooldown_lr

MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "pool_size": 4, "window": 2,
         "stride": 2, "top_k": 1, "expert_hidden": 16}
TRAIN = {"batch_tokens": 1024, "seq_len": 32, "lr": 3e-3, "schedule": "wsd", "warmup_frac": 0.0,
         "eval_every_tokens": 8192}


def _cfg(**train) -> TrialConfig:
    return TrialConfig.from_dict({"model": MODEL, "train": {**TRAIN, **train}, "data": {"val_tokens": 2048}})


def _finals(sink: NullSink) -> dict:
    return sink.reports[-1][1]


def test_cooldown_lr_shapes():
    lrs = [cooldown_lr(i, 4, 1.0, 0.1, "linear") for i in range(4)]
    assert lrs == pytest.approx([0.775, 0.55, 0.325, 0.1])
    sq = [cooldown_lr(i, 4, 1.0, 0.1, "1-sqrt") for i in range(4)]
    assert sq[-1] == pytest.approx(0.1) and sq[0] == pytest.approx(1 - 0.9 * math.sqrt(0.25))


def test_cooldown_options_are_checked():
    with pytest.raises(ConfigError, match="train.cooldown_at"):
        TrainConfig(tokens=32768, batch_tokens=1024, seq_len=32, cooldown_at=(8192,))  # cosine
    with pytest.raises(ConfigError, match="stable phase"):
        TrainConfig(tokens=32768, batch_tokens=1024, seq_len=32, schedule="wsd", cooldown_at=(30720,))
    with pytest.raises(ConfigError, match="increasing"):
        TrainConfig(tokens=32768, batch_tokens=1024, seq_len=32, schedule="wsd", cooldown_at=(16384, 8192))
    with pytest.raises(ConfigError, match="train.cooldown_frac"):
        TrainConfig(tokens=32768, batch_tokens=1024, seq_len=32, schedule="wsd", cooldown_frac=0.0)


def test_a_branch_is_the_separate_wsd_run_of_its_length_and_leaves_the_main_run_alone(tmp_path):
    # branch at 16 steps, 25% cooldown = 4 steps; the separate run: 20 steps, the last 4 decaying
    main = NullSink()
    train(_cfg(tokens=40960, decay_frac=0.2, cooldown_at=[16384], cooldown_frac=0.25), main, cache_dir=tmp_path)
    separate = NullSink()
    train(_cfg(tokens=20480, decay_frac=0.2), separate, cache_dir=tmp_path)
    plain = NullSink()
    train(_cfg(tokens=40960, decay_frac=0.2), plain, cache_dir=tmp_path)
    f = _finals(main)
    assert f["final/cooldown/16384/tokens"] == 20480 and f["final/cooldown/16384/branch_tokens"] == 4096
    assert f["final/cooldown/16384/val_loss"] == pytest.approx(_finals(separate)["final/val_loss"], rel=1e-5)
    assert f["final/cooldown/16384/flops"] == _finals(separate)["final/flops"]
    # the main run's curve is the run without branches
    for (ta, a), (tb, b) in zip(main.reports, plain.reports, strict=True):
        assert ta == tb and a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-6)
    assert all(is_tracked(k) for k in f if k.startswith("cooldown/"))


def test_branches_resume_with_the_run(tmp_path):
    cfg = _cfg(tokens=40960, decay_frac=0.2, cooldown_at=[8192, 24576], cooldown_frac=0.25)
    straight = NullSink()
    train(cfg, straight, cache_dir=tmp_path)
    first = NullSink()
    train(cfg, first, cache_dir=tmp_path)
    ckpt = next(c for t, c in first.checkpoints if t == 16384)  # after the first branch, before the second
    resumed = NullSink()
    train(cfg, resumed, cache_dir=tmp_path, resume=ckpt)
    want, got = _finals(straight), _finals(resumed)
    for key in ("final/cooldown/8192/val_loss", "final/cooldown/24576/val_loss", "final/val_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_the_loader_makes_each_branch_a_point():
    frame = pl.DataFrame({
        "run_id": ["a", "b"], "final/val_loss": [2.0, 1.9], "final/tokens": [4e6, 4e6], "final/flops": [1e12, 2e12],
        "final/cooldown/1000000/val_loss": [2.5, float("nan")], "final/cooldown/1000000/tokens": [1.2e6, 1.2e6],
        "final/cooldown/1000000/flops": [3e11, 6e11], "final/cooldown/1000000/branch_tokens": [2e5, 2e5],
    })
    out = with_cooldown_points(frame)
    assert out.height == 3 and not any(c.startswith("final/cooldown/") for c in out.columns)
    branch = out.filter(pl.col("point") == "cooldown@1000000")
    assert branch["run_id"].to_list() == ["a"]  # b's branch diverged (NaN): left out
    assert branch["final/val_loss"].to_list() == [2.5] and branch["final/tokens"].to_list() == [1.2e6]
    assert branch["final/flops"].to_list() == [3e11]


def test_the_loader_makes_each_intermediate_mark_a_point_resampled_with_its_run():
    from moue.analysis.fitting import prepare
    from moue.analysis.loading import with_mark_points

    frame = pl.DataFrame({"run_id": ["a", "b"], "final/val_loss": [2.0, 1.9], "final/tokens": [4e6, 4e6],
                          "final/flops": [1e12, 2e12], "derived.flops_per_token": [2.5e5, 5e5],
                          "derived.n_params_active": [1e4, 2e4]})
    curves = pl.DataFrame({"run_id": ["a", "a", "a", "b", "b"], "key": ["val/loss", "val/loss", "train/loss",
                                                                          "val/loss", "val/loss"],
                           "step": [1_000_000, 4_000_000, 1_000_000, 2_000_000, 0],
                           "value": [3.0, 2.0, 3.1, 2.4, 5.5]})
    out = with_mark_points(frame, curves)
    marks = out.filter(pl.col("point").str.starts_with("mark@")).sort("run_id")
    # a's mark at its final tokens is its final row; b's mark at 0 tokens is no point
    assert marks["run_id"].to_list() == ["a", "b"] and marks["final/val_loss"].to_list() == [3.0, 2.4]
    assert marks["final/tokens"].to_list() == [1e6, 2e6] and marks["final/flops"].to_list() == [2.5e11, 1e12]
    assert out.height == 4 and out.filter(pl.col("point") == "final").height == 2
    problem = prepare(out, law="compute_power")  # one cluster per run: a run resamples with its marks
    assert len(set(problem.points.cluster_index.tolist())) == 2


def test_bench_cooldown_compares_branches_with_separate_runs(tmp_path):
    from moue.bench import bench_cooldown

    cfg = _cfg(tokens=20480, warmup_frac=0.0)
    r = bench_cooldown(cfg, at=(8192,), frac=0.25, seeds=(0, 1), cache_dir=tmp_path)
    lengths = [p["tokens"] for p in r["points"]]
    assert lengths == [10240, 20480]
    for p in r["points"]:
        assert len(p["wsd"]) == len(p["cosine"]) == 2 and p["cosine_seed_sd"] >= 0
        assert p["mean_diff"] == pytest.approx(sum(p["diff"]) / 2)
    # the branch replaces a separate run of 10,240 tokens per seed at the cost of its 2,048
    assert r["separate_tokens"] == 2 * 10240 and r["wsd_tokens"] == 2 * (20480 + 2048)
    assert r["branch_tokens_vs_separate"] == pytest.approx(2048 / 10240)
