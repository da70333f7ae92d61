"""Parameter importance of a study's search axes (moue.analysis.importance): the axes are the settings
that vary on their own, and the axis the loss depends on gets the importance."""

from __future__ import annotations

import numpy as np
import polars as pl

from moue.analysis.importance import MIN_TRIALS, parameter_importance, search_axes
from conftest import DATA


def _grid(seed=0):
    """A 4 x 4 x 2-family grid: the loss falls with model.pool_size, not with model.window;
    model.expert_hidden is matched to the pool size (derived), train.seed varies (bookkeeping)."""
    rng = np.random.default_rng(seed)
    rows = []
    for fam in ("layerwise MoE", "MoUE-style"):
        for p in (4, 8, 16, 32):
            for w in (2, 3, 4, 5):
                rows.append({"family": fam, "model.pool_size": p, "model.window": w,
                             "model.expert_hidden": 256 // p * 4, "train.seed": int(rng.integers(9)),
                             "final/val_loss": 3.0 - 0.3 * np.log2(p) + 0.005 * rng.standard_normal()})
    return pl.DataFrame(rows)


def test_axes_are_the_settings_that_vary_on_their_own():
    frame = _grid()
    assert search_axes(frame) == ["family", "model.pool_size", "model.window"]
    ladder = pl.read_csv(DATA / "ladder_runs_20261201.csv", infer_schema_length=None)
    # heads, expert width, router state, tokens, warm-up and LR are derived from the size
    assert search_axes(ladder) == ["family", "model.d_model"]


def test_the_axis_the_loss_depends_on_is_the_important_one():
    imp = parameter_importance(_grid())
    assert imp is not None and imp.n_trials == 32
    assert list(imp.scores)[0] == "model.pool_size" and imp.scores["model.pool_size"] > 0.8
    assert abs(sum(imp.scores.values()) - 1) < 1e-9
    assert parameter_importance(_grid().head(MIN_TRIALS - 1)) is None  # too few trials
