"""Paired comparisons of variants (moue.analysis.paired)."""

from __future__ import annotations

import polars as pl
import pytest
from scipy import stats

from moue.analysis.paired import compare_variants


def test_paired_differences_and_t_test():
    ref = [2.00, 2.10, 1.90, 2.05]
    var = [1.95, 2.08, 1.86, 2.06]
    frame = pl.DataFrame({"family": ["a"] * 4 + ["b"] * 4, "seed": [0, 1, 2, 3] * 2, "L": [2, 2, 4, 4] * 2,
                          "final/val_loss": ref + var})
    (c,) = compare_variants(frame, variant=["family"], reference="base", pair=["L", "seed"],
                            label={"a": "base", "b": "new"})
    d = [v - r for v, r in zip(var, ref)]
    assert c.variant == "new" and c.n_pairs == 4 and c.n_better == 3
    assert c.mean_diff == pytest.approx(sum(d) / 4)
    assert c.p_value == pytest.approx(stats.ttest_rel(var, ref).pvalue)
    assert set(c.by_group) == {"2", "4"}
    assert c.by_group["2"] == pytest.approx(100 * ((1.95 - 2.0) / 2.0 + (2.08 - 2.1) / 2.1) / 2)


def test_a_labelled_reference_is_named_by_its_value_or_its_label():
    frame = pl.DataFrame({"family": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "final/val_loss": [2.0, 2.1, 1.9, 2.0]})
    by_value = compare_variants(frame, variant=["family"], reference="a", pair=["seed"], label={"a": "base"})
    by_label = compare_variants(frame, variant=["family"], reference="base", pair=["seed"], label={"a": "base"})
    assert by_value == by_label and by_value[0].reference == "base" and by_value[0].n_pairs == 2


def test_unpaired_runs_are_left_out():
    frame = pl.DataFrame({"family": ["a", "a", "b"], "seed": [0, 1, 0], "final/val_loss": [2.0, 2.1, 1.9]})
    (c,) = compare_variants(frame, variant=["family"], reference="a", pair=["seed"])
    assert c.n_pairs == 1


def test_topology_labels():
    from moue.analysis.paired import with_topology

    frame = pl.DataFrame({"model.pool_size": [8, 8, 8], "model.window": [4, 8, 7], "model.stride": [4, 0, 4],
                          "model.n_layers": [2, 2, 2]})
    assert with_topology(frame)["topology"].to_list() == ["layerwise", "unipool", "rotational"]


def test_compare_command(cli, logged_study):
    import json

    uri, exp, _, _ = logged_study
    r = cli("compare", exp, "--tracking-uri", uri, "--variant", "model.window", "--reference", "w16",
            "--label", "w16=16", "--pair", "model.d_model", "--pair", "final/tokens", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and all(row["reference"] == "w16" and row["n_pairs"] >= 10 for row in rows)
    assert all(row["verdict"] in ("detected", "ruled_out", "undecided") and row["margin_pct"] == 1.0
               and row["mde_pct"] > 0 for row in rows)
    r = cli("compare", exp, "--tracking-uri", uri, "--variant", "model.window", "--reference", "16",
            "--pair", "model.d_model", "--pair", "final/tokens", "--margin", "50")
    assert r.exit_code == 0 and r.output.count("verdict: ") == 3, r.output
    assert "detected (" in r.output and "smaller than the 50% margin" in r.output
    r = cli("compare", exp, "--tracking-uri", uri, "--variant", "model.window", "--reference", "16", "--margin", "-1")
    assert r.exit_code == 2 and "--margin" in r.output
    r = cli("compare", exp, "--tracking-uri", uri, "--variant", "topology", "--reference", "nope")
    assert r.exit_code == 2 and "is not a variant" in r.output


def test_family_labels_name_the_architectures():
    from moue.analysis.figures import family_labels

    frame = pl.DataFrame({"model.pool_size": [8, 8, 8, 8], "model.window": [4, 8, 7, 7], "model.stride": [4, 0, 4, 4],
                          "model.n_layers": [2, 2, 2, 2], "model.router": ["softmax", "norm", "trajectory", "softmax"],
                          "model.balance": ["switch", "pool", "exposure", "exposure"],
                          "model.window_layout": ["ring", "ring", "clamped", "ring"]})
    assert family_labels(frame) == ["layerwise MoE", "UniPool-style", "MoUE-style", "rotational + exposure"]
    assert family_labels(pl.DataFrame({"x": [1]})) is None


def test_relative_interval_is_the_t_interval_of_the_pair_differences():
    import math

    ref = [2.00, 2.10, 1.90, 2.05]
    var = [1.95, 2.08, 1.86, 2.06]
    frame = pl.DataFrame({"family": ["a"] * 4 + ["b"] * 4, "seed": [0, 1, 2, 3] * 2, "final/val_loss": ref + var})
    (c,) = compare_variants(frame, variant=["family"], reference="a", pair=["seed"])
    rel = [100 * (v - r) / r for v, r in zip(var, ref)]
    m = sum(rel) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in rel) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert c.mean_rel_diff == pytest.approx(m) and c.rel_ci == pytest.approx((m - half, m + half))


def test_family_comparisons_pair_families_by_size():
    from moue.analysis.report import family_comparisons

    sizes = [32, 48, 64, 96]
    rows = []
    for fam, (P, w, s, router, balance, layout), bump in (
            ("lw", (8, 4, 4, "softmax", "switch", "ring"), 0.0),
            ("up", (8, 8, 0, "norm", "pool", "ring"), 0.05),
            ("mo", (8, 7, 4, "trajectory", "exposure", "clamped"), -0.02)):
        for i, d in enumerate(sizes):
            rows.append({"model.d_model": d, "model.n_layers": 2, "train.seed": 0, "model.pool_size": P,
                         "model.window": w, "model.stride": s, "model.router": router, "model.balance": balance,
                         "model.window_layout": layout, "final/val_loss": 2.0 - 0.1 * i + bump + 0.001 * i})
    out = {c.variant: c for c in family_comparisons(pl.DataFrame(rows))}
    assert set(out) == {"UniPool-style", "MoUE-style"}
    assert out["UniPool-style"].n_pairs == 4 and out["UniPool-style"].mean_rel_diff > 0
    assert out["MoUE-style"].n_better == 4 and out["MoUE-style"].rel_ci[1] < 0
    # several runs of a family per size (two seeds' runs logged with one seed): no pairs, no comparison
    assert family_comparisons(pl.DataFrame(rows + rows)) == ()
    # several token budgets per size: paired by budget too
    budgets = [{**r, "train.tokens": t, "final/val_loss": r["final/val_loss"] - 0.1 * k}
               for k, t in enumerate((1000, 2000)) for r in rows]
    out = {c.variant: c for c in family_comparisons(pl.DataFrame(budgets))}
    assert out["UniPool-style"].n_pairs == 8 and out["MoUE-style"].n_better == 8
    # a grid over the pool (experts per layer) at one size: each family against the layerwise MoE of its pool
    grid = []
    for E in (2, 4):  # experts per layer: P = 2E, layerwise w = E, UniPool-style w = P, MoUE-style w = 2E - 1
        for seed in (0, 1):
            for (w, s_, router, balance, bump) in ((E, E, "softmax", "switch", 0.0), (2 * E, 0, "norm", "pool", 0.05),
                                                   (2 * E - 1, E, "trajectory", "exposure", -0.02)):
                grid.append({"model.d_model": 64, "model.n_layers": 2, "train.seed": seed, "model.pool_size": 2 * E,
                             "model.window": w, "model.stride": s_, "model.router": router, "model.balance": balance,
                             "model.window_layout": "ring", "final/val_loss": 2.0 - 0.05 * E + bump + 0.001 * seed})
    out = {c.variant: c for c in family_comparisons(pl.DataFrame(grid))}
    assert out["MoUE-style (ring)"].n_pairs == 4 and out["MoUE-style (ring)"].rel_ci[1] < 0
