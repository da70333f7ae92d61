"""Search spaces: every point valid, static define-by-run distributions, matched families, pruning,
option errors, hand-checked counts, and no torch/ray on import."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest

import moue.search_spaces as ss
from moue.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)

# a quickstart-scale study and a smoke-scale one (flat dotted keys, as a spec's fixed settings)
TYPICAL = {"model.d_model": 128, "model.n_layers": 4, "model.top_k": 2, "model.expert_hidden": 128,
           "train.tokens": 524288}
TINY = {"model.d_model": 32, "model.n_layers": 2, "model.expert_hidden": 16, "model.max_seq_len": 64,
        "model.pool_size": 8, "model.window": 4, "model.stride": 4, "train.seq_len": 32,
        "train.batch_tokens": 1024, "train.tokens": 8192}
TINY_BARE = {"model.d_model": 32, "model.n_layers": 2, "model.expert_hidden": 16}  # study's pool left default
SECTIONS = ("model.", "train.", "data.", "convert.")

NAMES = sorted(ss.SPACES)


def assert_points_valid(points, fixed):
    for point in points:
        assert all(k.startswith(SECTIONS) for k in point), point
        assert ss.check_point({**fixed, **point}) is None, (point, ss.check_point({**fixed, **point}))


# -- the registry and the import boundary -------------------------------------------------------

def test_import_does_not_load_torch_or_ray():
    code = ("import sys, json, search_spaces; "
            "print(json.dumps({m: m in sys.modules for m in ('torch', 'ray', 'optuna')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False, "ray": False, "optuna": False}


def test_registry_and_unknown_space():
    assert set(ss.SPACES) == {"virtual_width", "pool_size", "rotation", "depth", "router_balance",
                              "conversion", "lr", "ladder"}
    assert set(ss.__all__) <= set(dir(ss))
    for name, space in ss.SPACES.items():
        assert ss.get_space(name) is space and space.name == name
        assert space.description and "\n" not in space.description
    with pytest.raises(ConfigError) as err:
        ss.get_space("nope")
    assert err.value.field == "search.space"
    assert "conversion, depth, ladder, lr, pool_size, rotation, router_balance, virtual_width" in str(err.value)


# -- grids --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fixed", [TYPICAL, TINY, TINY_BARE], ids=["typical", "tiny", "tiny-bare"])
@pytest.mark.parametrize("which", ["defaults", "smoke"])
def test_grid_points_are_valid(name, fixed, which):
    space = ss.get_space(name)
    options = dict(space.smoke) if which == "smoke" else {}
    kept, pruned = space.grid_pruned(fixed, options)
    assert kept == space.grid(fixed, options)
    assert_points_valid(kept, fixed)
    for point, reason in pruned:
        assert reason and "\n" not in reason
        assert point not in kept
    if fixed is TYPICAL and which == "defaults":
        assert 8 <= len(kept) <= 30, (name, len(kept))
    if fixed is TINY and which == "smoke":
        assert 2 <= len(kept) <= 4, (name, len(kept), pruned)


def test_grid_prunes_with_reasons():
    space = ss.get_space("virtual_width")
    kept, pruned = space.grid_pruned(TYPICAL, {"experts_per_layer": [2], "top_k": [2, 4],
                                               "families": ["layerwise"]})
    assert [p["model.top_k"] for p in kept] == [2]
    assert len(pruned) == 1
    assert pruned[0][1] == "model.top_k (4) must be <= model.window (2)"
    # a rotation whose windows cannot cover the ring is pruned, not emitted
    kept, pruned = ss.get_space("rotation").grid_pruned(TYPICAL, {"window_fractions": [0.25], "overlaps": [0.0, 0.5]})
    assert kept == [{"model.window": 4, "model.stride": 4}]
    assert pruned == [({"model.window": 4, "model.stride": 2},
                       "model.stride (2) leaves experts unreachable: 6 of 16 experts are in no layer's window")]


def test_prune_and_check_point():
    points = [{"model.top_k": 9, "model.window": 8}, {"model.window": 8, "model.stride": 4},
              {"model.window": 4, "model.stride": 2}]
    kept, pruned = ss.prune(points, TYPICAL)
    assert kept == [points[1]]
    assert [r for _, r in pruned] == [
        "model.top_k (9) must be <= model.window (8)",
        "model.stride (2) leaves experts unreachable: 6 of 16 experts are in no layer's window",
    ]
    assert ss.check_point(TYPICAL) is None
    assert ss.check_point({**TYPICAL, "search.x": 1}).startswith("search.x (1) is not a setting")
    assert ss.check_point({**TYPICAL, "model.nope": 1}).startswith("model.nope (1) is not a model setting")
    assert ss.check_point({**TYPICAL, "train.nope": 1}).startswith("train.nope (1) is not a train setting")
    assert ss.check_point({**TYPICAL, "train.seq_len": 512}) == "train.seq_len (512) must be <= model.max_seq_len (256)"
    assert ss.check_point({**TYPICAL, "train.widen_tokens": 10**9}).startswith(
        "train.widen_tokens (1000000000) must be <=")
    assert "needs a window to widen" in ss.check_point(
        {**TYPICAL, "model.pool_size": 8, "model.window": 2, "model.stride": 2, "train.widen_tokens": 8192})
    assert ss.check_point({**TYPICAL, "convert.router_init": "random"}) == \
        "convert.router_init ('random') must be one of zero, copy"


def test_train_defaults_are_read_from_trainconfig():
    import dataclasses

    from moue.train import TrainConfig  # imports torch: only here, never in search_spaces

    assert ss.train_defaults() == {f.name: f.default for f in dataclasses.fields(TrainConfig)}


# -- define-by-run ------------------------------------------------------------------------------

def _run_study(space, fixed, options, n_trials=30, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=8))
    points, distributions = [], []
    for _ in range(n_trials):
        trial = study.ask()
        point = space.define(trial, fixed, options)
        points.append(point)
        distributions.append(dict(trial.distributions))
        # the suggested settings and the point agree; search coordinates stay out of the point
        for key, value in trial.params.items():
            if key.startswith(ss.SEARCH_PREFIX):
                assert key not in point
            else:
                assert point[key] == value, (key, point, trial.params)
        # any deterministic objective lets TPE leave its start-up phase
        study.tell(trial, ss.active_params({**fixed, **point}) * 1e-6 + len(repr(sorted(point.items()))) * 1e-3)
    return points, distributions


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fixed,which", [(TYPICAL, "defaults"), (TINY, "smoke")], ids=["typical", "tiny-smoke"])
def test_define_by_run_is_valid_static_and_seeded(name, fixed, which):
    space = ss.get_space(name)
    options = dict(space.smoke) if which == "smoke" else {}
    points, distributions = _run_study(space, fixed, options)
    assert_points_valid(points, fixed)
    assert all(d == distributions[0] for d in distributions), "distributions must be static"
    assert len({repr(sorted(p.items())) for p in points}) > 1, "define-by-run explores"
    again, _ = _run_study(space, fixed, options)
    assert again == points, "same seed, same sequence"


def test_define_refuses_an_impossible_point():
    # a rotational family needs two layers: no derivation can repair depth 1
    space = ss.get_space("virtual_width")
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    with pytest.raises(ConfigError, match="suggested an impossible point"):
        space.define(trial, TYPICAL, {"families": ["moue"], "n_layers": [1]})


# -- the three architectures of virtual_width -----------------------------------------------------

FAMILY_ROUTING = {"layerwise": ("softmax", "switch"), "unipool": ("norm", "pool"), "moue": ("trajectory", "exposure")}


def test_virtual_width_families_are_the_architectures_and_iso_active():
    space = ss.get_space("virtual_width")
    options = {"top_k": [1, 2], "n_layers": [2, 4], "experts_per_layer": [2, 4, 8]}
    kept, pruned = space.grid_pruned(TYPICAL, options)
    assert not pruned and len(kept) == 2 * 2 * 3 * 3
    matched = {}  # (L, E) -> active count of the layerwise MoE at the study's k and f
    for L in (2, 4):
        for E in (2, 4, 8):
            ref = {**TYPICAL, "model.n_layers": L, "model.pool_size": L * E, "model.window": E,
                   "model.stride": E % (L * E)}
            matched[L, E] = ss.active_params(ref)
    seen = set()
    for point in kept:
        flat = {**TYPICAL, **point}
        L, P, w, s = (flat[f"model.{n}"] for n in ("n_layers", "pool_size", "window", "stride"))
        family = ss.topology_family(flat)
        seen.add(family)
        assert (flat["model.router"], flat["model.balance"]) == FAMILY_ROUTING[family]
        E = P // L
        assert P == L * E
        if family == "layerwise":
            assert (w, s) == (E, E)
        elif family == "unipool":
            assert (w, s) == (P, 0)
        else:
            assert w < P and 0 < s < w
        assert ss.virtual_width(flat) == L * w
        # iso-active with the matched layerwise MoE of the same depth and E, within 2%
        assert abs(ss.active_params(flat) - matched[L, E]) <= 0.02 * matched[L, E], point
        # k * f about constant; the trajectory router's state (here d_r = 64 at d = 128) is paid for
        # by smaller experts, the other routers' extra window rows by a few multiples of 4 at most
        kf = flat["model.top_k"] * flat["model.expert_hidden"]
        if family == "moue":
            assert kf < 2 * 128
        else:
            assert abs(kf - 2 * 128) <= 0.05 * 256, point
    assert seen == {"layerwise", "unipool", "moue"}
    # depth is not matched: deeper models have more active parameters
    assert matched[4, 4] > matched[2, 4]


def test_virtual_width_over_model_widths():
    """``d_models``: a second size axis. Points at another width carry it and scale the expert
    width (and the MoUE-style router state) with d; every point stays iso-active with the
    layerwise MoE of its own width; the study's own width yields exactly the points without the
    option; define-by-run explores the widths too."""
    space = ss.get_space("virtual_width")
    base_d, f0 = TYPICAL["model.d_model"], TYPICAL["model.expert_hidden"]
    options = {"experts_per_layer": [4], "d_models": [base_d // 2, base_d, base_d * 2]}
    kept, pruned = space.grid_pruned(TYPICAL, options)
    assert not pruned and len(kept) == 3 * 3
    assert [p for p in kept if "model.d_model" not in p] == space.grid(TYPICAL, {"experts_per_layer": [4]})
    actives = {}
    for point in kept:
        flat = {**TYPICAL, **point}
        d = flat["model.d_model"]
        actives.setdefault(d, []).append(ss.active_params(flat))
        if d != base_d:
            assert point["model.d_model"] == d
            if point["model.router"] == "softmax":  # the matched MoE itself: f scaled exactly
                assert point["model.expert_hidden"] == f0 * d // base_d
            if point["model.router"] == "trajectory":
                from moue.search_spaces.constraints import model_value

                assert point["model.router_state_dim"] == model_value(TYPICAL, "router_state_dim") * d // base_d
    for d, counts in actives.items():  # each within 2% of its width's matched MoE
        assert max(counts) <= 1.02 / 0.98 * min(counts), (d, counts)
    assert min(actives[base_d * 2]) > 3 * max(actives[base_d])  # width is a size axis
    points, _ = _run_study(space, TYPICAL, {"experts_per_layer": [4], "d_models": [base_d // 2, base_d * 2]})
    assert_points_valid(points, TYPICAL)
    assert {p.get("model.d_model") for p in points} == {base_d // 2, base_d * 2}


def test_virtual_width_match_none_keeps_k_times_f():
    kept = ss.get_space("virtual_width").grid(TYPICAL, {"match": "none", "top_k": [1, 2, 4], "experts_per_layer": [4]})
    assert {p["model.top_k"] * p["model.expert_hidden"] for p in kept} == {256}


def test_virtual_width_tolerance_prunes_unmatchable_points():
    # at tiny width a 64-dim trajectory state outweighs the experts it would have to shrink
    kept, pruned = ss.get_space("virtual_width").grid_pruned(TINY, {"experts_per_layer": [2], "families": ["moue"]})
    assert not kept
    assert "differ from the matched layerwise MoE's" in pruned[0][1] and "space.active_tol = 0.02" in pruned[0][1]


# -- matching helpers, hand-checked ---------------------------------------------------------------

def test_counts_and_matching_by_hand():
    d, L, k, f = 128, 4, 2, 128
    trunk = L * (4 * d * d + 2 * d) + d  # attention + two norms per block + final norm
    layerwise = {**TYPICAL, "model.pool_size": 16, "model.window": 4, "model.stride": 4}
    active = trunk + L * k * 3 * d * f + L * 4 * d  # k experts and the window's router rows per layer
    total = trunk + 16 * 3 * d * f + L * 4 * d
    assert (ss.active_params(layerwise), ss.total_params(layerwise)) == (active, total) == (658560, 1051776)
    assert ss.virtual_width(layerwise) == 16
    # iso-active: top-1 needs twice the expert hidden size
    assert ss.match_expert_hidden({**layerwise, "model.top_k": 1}, active) == 256
    assert ss.match_expert_hidden(layerwise, active) == 128
    assert ss.match_expert_hidden(layerwise, 0) == 4  # never below the smallest multiple of 4
    # iso-total: a w=8 rotational pool with the layerwise MoE's stored parameters:
    # trunk + P * 3*d*f + L*8*d = total  ->  P = 15.96 -> 16
    assert ss.match_pool_size({**TYPICAL, "model.window": 8, "model.stride": 4}, total) == 16
    # UniPool's window follows its pool: trunk + P * (3*d*f + L*d) = total -> P = 15.88 -> 16
    assert ss.match_pool_size({**TYPICAL, "model.pool_size": 32, "model.window": 32, "model.stride": 0}, total) == 16
    assert ss.match_pool_size({**TYPICAL, "model.window": 8, "model.stride": 4}, total // 2) == 8


def test_topology_family():
    def family(P, w, s):
        return ss.topology_family({"model.n_layers": 4, "model.pool_size": P, "model.window": w, "model.stride": s})

    assert [family(16, 4, 4), family(6, 6, 0), family(16, 8, 4), family(12, 4, 4)] == \
        ["layerwise", "unipool", "moue", "other"]


# -- the other spaces' claims ---------------------------------------------------------------------

def test_pool_size_reduces_the_pool_unipool_style():
    kept = ss.get_space("pool_size").grid(TYPICAL, {"experts_per_layer": [8]})
    assert [p["model.pool_size"] for p in kept] == [32, 32, 21, 16, 13]  # layerwise, then 1, .667, .5, .417
    assert ss.topology_family({**TYPICAL, **kept[0]}) == "layerwise"
    for p in kept[1:]:
        assert (p["model.window"], p["model.stride"], p["model.router"], p["model.balance"]) == \
            (p["model.pool_size"], 0, "norm", "pool")


def test_depth_grows_virtual_width_on_a_fixed_pool():
    kept = ss.get_space("depth").grid(TYPICAL, {"families": ["shared"], "n_layers": [2, 4, 8]})
    flats = [{**TYPICAL, **p} for p in kept]
    assert [ss.virtual_width(f) for f in flats] == [16, 32, 64]
    assert {ss.counts(f).physical_width for f in flats} == {16}  # the pool stays the study's
    actives = [ss.active_params(f) for f in flats]
    assert actives == sorted(actives) and actives[0] < actives[-1]  # depth is not matched
    assert kept[0] == {"model.n_layers": 2, "model.stride": 8}  # stride raised so 2 layers reach all 16


def test_conversion_points():
    kept = ss.get_space("conversion").grid(TYPICAL, {"experts_per_layer": 4})
    assert len(kept) == 1 + 2 * 2 * 2
    control = kept[0]
    assert (control["model.window"], control["train.widen_tokens"]) == (4, 0)
    for p in kept:
        assert (p["model.pool_size"], p["model.stride"], p["model.router"]) == (16, 4, "softmax")
        assert p["convert.router_init"] in ("zero", "copy")
        assert ss.layerwise_base(p) == {"model.pool_size": 16, "model.window": 4, "model.stride": 4,
                                        "model.router": "softmax"}
    assert {p["model.window"] for p in kept} == {4, 8, 16}
    assert {p["train.widen_tokens"] for p in kept[1:]} == {131072, 262144}  # 1/4 and 1/2 of the budget


def test_lr_log_grid_per_width():
    kept = ss.get_space("lr").grid(TYPICAL, {"d_models": [64, 128], "lr_min": 1e-3, "lr_max": 1e-2,
                                             "lr_points": 3, "head_dim": 16})
    assert [(p["model.d_model"], p["train.lr"], p["model.n_heads"]) for p in kept] == [
        (64, 0.001, 4), (64, 0.00316, 4), (64, 0.01, 4), (128, 0.001, 8), (128, 0.00316, 8), (128, 0.01, 8)]


# -- options --------------------------------------------------------------------------------------

def test_options_defaults_and_errors():
    space = ss.get_space("virtual_width")
    assert space.options({}) == dict(space.defaults)
    assert space.options({"experts_per_layer": [4, 4, 2]})["experts_per_layer"] == [4, 2]
    assert space.options({"active_tol": 0})["active_tol"] == 0.0
    bad = [
        ({"nope": 1}, "space.nope", "is not an option of space 'virtual_width'; allowed: active_tol,"),
        ({"families": "moue"}, "space.families", "must be a list"),
        ({"families": ["moe"]}, "space.families", "must be one of layerwise, unipool, moue"),
        ({"families": []}, "space.families", "must not be empty"),
        ({"experts_per_layer": [2.5]}, "space.experts_per_layer", "must be an integer"),
        ({"moue_window": True}, "space.moue_window", "must be an integer"),
        ({"match": 3}, "space.match", "must be a string"),
        ({"moue_overlap": 1.5}, "space.moue_overlap", "must be in [0.0, 0.95]"),
    ]
    for given, field, text in bad:
        with pytest.raises(ConfigError) as err:
            space.options(given)
        assert err.value.field == field and text in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=r"space.lr_min \(0.1\) must be <= space.lr_max"):
        ss.get_space("lr").options({"lr_min": 0.1, "lr_max": 0.01})
    with pytest.raises(ConfigError, match="space.include_layerwise"):
        ss.get_space("pool_size").grid(TYPICAL, {"include_layerwise": "yes"})


def test_a_width_the_heads_cannot_split_is_an_error_for_grid_and_sampler():
    space = ss.get_space("virtual_width")
    for make in (lambda o: space.grid(TYPICAL, o),
                 lambda o: space.define(optuna.create_study().ask(), TYPICAL, o)):
        with pytest.raises(ConfigError) as err:
            make({"experts_per_layer": [4], "d_models": [128, 100]})
        assert err.value.field == "space.d_models" and err.value.value == 100, str(err.value)
