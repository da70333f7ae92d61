"""The options MoE researchers expect (issue 12), each off by default, counted and checked against
an independent reference: capacity with token dropping, the sigmoid router with selection-only
bias (per layer and pool-wide), dense layers among MoE layers, dense-to-MoE upcycling, expert-choice
and unified (USMoE) routing, the per-layer load metrics, and iso-active matching that pays with
the router state instead of the expert width.
"""

from __future__ import annotations

import math

import pytest
import torch

import moue.search_spaces as ss
from moue import ConfigError, ModelConfig, MoUEModel, upcycle_dense
from moue.counting import check_counts, count
from moue.moe import ExpertPool, dispatch
from moue.router import Router, capacity, within_capacity
from moue.train import _load_metrics
from moue.tracking_contract import is_tracked

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, expert_hidden=16,
                   dense_hidden=16, top_k=2, pool_size=10, window=5, stride=3)


def _tokens(seed: int = 1, shape=(2, 8)) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def _naive_moe(x_TD, pairs, pool: ExpertPool) -> torch.Tensor:
    """``sum`` over the listed (token, pool id, gate) pairs of ``gate * expert(x)``, one at a time."""
    y = torch.zeros_like(x_TD)
    F = pool.hidden
    for t, p, g in pairs:
        h = x_TD[t] @ pool.w_in_PDF2[p]
        y[t] = y[t] + g * ((torch.nn.functional.silu(h[:F]) * h[F:]) @ pool.w_out_PFD[p])
    return y


# ------------------------------------------------------------------ capacity factor


def test_capacity_keeps_top1_choices_first_then_token_order() -> None:
    slots = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])  # T=4, K=2
    keep = within_capacity(slots, window=3, cap=2)
    # slot 0: top-1 of tokens 0, 1, 3 -> tokens 0 and 1 fit, token 3's top-1 is dropped, and token
    # 2's second choice (slot 0) comes after every top-1 choice, so it is dropped too; slot 1: token
    # 2's top-1, then the second choices of tokens 0 and 3 in token order -> token 3's is dropped
    assert keep.tolist() == [[True, True], [True, True], [True, False], [False, False]]
    assert capacity(tokens=64, top_k=2, window=5, factor=1.25) == math.ceil(1.25 * 64 * 2 / 5)


def test_dropped_pairs_are_skipped_and_reported() -> None:
    cfg = BASE.replace(capacity_factor=0.5)
    torch.manual_seed(0)
    model = MoUEModel(cfg)
    routes = []
    handle = model.moe.register_forward_hook(lambda m, a, out: routes.append((a[1], out[0], out[1])))
    out = model(_tokens())
    handle.remove()
    dropped = 0
    for x, y, route in routes:
        assert route.keep_TK is not None and not route.keep_TK.all()
        cap = capacity(x.shape[0], cfg.top_k, cfg.window, 0.5)
        kept_slots = route.slots_TK[route.keep_TK]
        assert kept_slots.bincount(minlength=cfg.window).max() <= cap
        pairs = [(t, int(route.ids_TK[t, k]), route.gates_TK[t, k]) for t in range(x.shape[0])
                 for k in range(cfg.top_k) if route.keep_TK[t, k]]
        torch.testing.assert_close(y, _naive_moe(x, pairs, model.moe.pool), rtol=1e-5, atol=1e-6)
        dropped += route.n_dropped()
    assert out.stats.dropped_frac == pytest.approx(dropped / (len(routes) * 16 * cfg.top_k))
    assert out.stats.dropped_frac > 0
    # the loads count what the router chose, before the drop
    assert out.stats.load_Lw.sum() == len(routes) * 16 * cfg.top_k
    # a generous capacity drops nothing and equals the dropless model
    torch.manual_seed(0)
    roomy = MoUEModel(BASE.replace(capacity_factor=float(cfg.window)))
    torch.manual_seed(0)
    dropless = MoUEModel(BASE)
    idx = _tokens()
    a, b = roomy(idx), dropless(idx)
    assert a.stats.dropped_frac == 0
    torch.testing.assert_close(a.logits, b.logits)


def test_capacity_gradient_reaches_kept_experts_only() -> None:
    torch.manual_seed(0)
    pool = ExpertPool(4, 8, 8, 0.1)
    x = torch.randn(6, 8)
    ids = torch.tensor([[0, 1]] * 6)
    gates = torch.full((6, 2), 0.5, requires_grad=True)
    keep = torch.ones(6, 2, dtype=torch.bool)
    keep[:, 1] = False  # nothing reaches expert 1
    y = dispatch(x, ids, gates, pool, keep_TK=keep)
    y.sum().backward()
    assert pool.w_in_PDF2.grad[1].abs().sum() == 0 and pool.w_in_PDF2.grad[0].abs().sum() > 0
    assert (gates.grad[:, 1] == 0).all() and (gates.grad[:, 0] != 0).all()


# ------------------------------------------------------------------ expert bias: pool scope


def test_pool_scope_bias_is_shared_by_layers_and_moves_with_the_pooled_load() -> None:
    cfg = BASE.replace(router="sigmoid", expert_bias=True, expert_bias_scope="pool")
    router = Router(cfg)
    assert not hasattr(router, "bias_LW") and router.bias_P.shape == (cfg.pool_size,)
    topo = cfg.topology
    load = torch.zeros(cfg.n_layers, cfg.window)
    hot = topo.window_ids(0)[0]
    for layer in range(cfg.n_layers):  # every layer that reaches `hot` sends it 10 tokens, others 1
        for j, p in enumerate(topo.window_ids(layer)):
            load[layer, j] = 10.0 if p == hot else 1.0
    router.update_bias(load)
    assert router.bias_P[hot] == pytest.approx(-cfg.expert_bias_rate)
    others = [p for p in range(cfg.pool_size) if p != hot and topo.exposure[p] > 0]
    assert all(router.bias_P[p] == pytest.approx(cfg.expert_bias_rate) for p in others)
    # the same pool expert gets the same bias in every layer that reaches it (selection only)
    x = torch.randn(16, cfg.d_model)
    with torch.no_grad():
        router.bias_P.zero_()
        router.bias_P[hot] = 10.0  # forces `hot` into every window that holds it
    for layer in range(cfg.n_layers):
        route, _ = router(layer, x, None, cfg.window)
        if hot in topo.window_ids(layer):
            assert (route.ids_TK == hot).any(dim=-1).all()
        gates = route.gates_TK
        torch.testing.assert_close(gates.sum(-1), torch.ones(16))  # normalised unbiased sigmoid scores
        scores = torch.sigmoid(route.logits_Tw).gather(1, route.slots_TK)
        torch.testing.assert_close(gates, scores / scores.sum(-1, keepdim=True))


# ------------------------------------------------------------------ dense layers among MoE layers


@pytest.mark.parametrize("changes, layers", [
    (dict(dense_first=1), (1, 2, 3)),
    (dict(moe_every=2), (0, 2)),
    (dict(dense_first=1, moe_every=2, router="trajectory", router_state_dim=8), (1, 3)),
])
def test_dense_layers_among_moe_layers(changes, layers) -> None:
    cfg = BASE.replace(**changes)
    assert cfg.moe_layers == layers
    torch.manual_seed(0)
    model = MoUEModel(cfg)
    counts = check_counts(model, cfg)
    assert counts.virtual_width == len(layers) * cfg.window
    for layer, block in enumerate(model.blocks):
        assert hasattr(block, "mlp") == (layer not in layers)
    out = model(_tokens())
    assert out.stats.load_Lw.shape[0] == len(layers)
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    dense = next(i for i in range(cfg.n_layers) if i not in layers)
    assert model.blocks[dense].mlp.w_in.weight.grad.abs().sum() > 0
    assert model.moe.pool.w_in_PDF2.grad.abs().sum() > 0
    assert model.moe.router.weight_LWD.shape[0] == len(layers)


def test_dense_layer_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="model.dense_first"):
        BASE.replace(dense_first=4)
    with pytest.raises(ConfigError, match="model.moe_every"):
        BASE.replace(moe_every=0)
    with pytest.raises(ConfigError, match="model.balance_depth_weights"):
        BASE.replace(dense_first=1, balance="exposure", balance_depth_weights=(1.0, 1.0, 1.0, 1.0))
    BASE.replace(dense_first=1, balance="exposure", balance_depth_weights=(1.0, 2.0, 3.0))


# ------------------------------------------------------------------ upcycling


def _dense_source() -> tuple[ModelConfig, MoUEModel]:
    src = BASE.replace(ffn="dense", dense_hidden=16)
    torch.manual_seed(3)
    return src, MoUEModel(src)


def test_upcycling_a_dense_model_into_a_layerwise_moe_keeps_its_logits() -> None:
    src, dense = _dense_source()
    target = src.replace(ffn="moe", pool_size=8, window=2, stride=2, expert_hidden=16)
    state = upcycle_dense(dense.state_dict(), src, target)
    model = MoUEModel(target)
    model.load_state_dict(state, strict=True)
    idx = _tokens()
    torch.testing.assert_close(model(idx).logits, dense(idx).logits, rtol=1e-5, atol=1e-5)
    # every expert is a copy of its layer's FFN
    w_in = dense.blocks[2].mlp.w_in.weight.t()
    assert torch.equal(state["moe.pool.w_in_PDF2"][4], w_in) and torch.equal(state["moe.pool.w_in_PDF2"][5], w_in)
    # noise makes the copies differ, in proportion
    noisy = upcycle_dense(dense.state_dict(), src, target, noise=0.01)["moe.pool.w_in_PDF2"]
    rel = ((noisy[4] - w_in) / w_in).std()
    assert 0.005 < float(rel) < 0.02 and not torch.equal(noisy[4], noisy[5])


def test_upcycling_into_shared_pools_and_dense_layers() -> None:
    src, dense = _dense_source()
    target = src.replace(ffn="moe", pool_size=6, window=3, stride=3, expert_hidden=16, dense_first=1,
                         router="trajectory", router_state_dim=8, n_shared=1)
    state = upcycle_dense(dense.state_dict(), src, target)
    model = MoUEModel(target)
    model.load_state_dict(state, strict=True)
    assert torch.equal(state["blocks.0.mlp.w_in.weight"], dense.state_dict()["blocks.0.mlp.w_in.weight"])
    # expert 0 is held first by MoE layer 0 (model layer 1)
    assert torch.equal(state["moe.pool.w_in_PDF2"][0], dense.blocks[1].mlp.w_in.weight.t())
    with pytest.raises(ConfigError, match="model.expert_hidden"):
        upcycle_dense(dense.state_dict(), src, target.replace(expert_hidden=32))
    with pytest.raises(ConfigError, match="convert.source"):
        upcycle_dense(model.state_dict(), target, target)


# ------------------------------------------------------------------ expert choice and unified routing


def test_expert_choice_gives_every_slot_its_best_tokens() -> None:
    cfg = BASE.replace(routing="expert")
    torch.manual_seed(0)
    router = Router(cfg)
    x = torch.randn(20, cfg.d_model)
    route, _ = router(1, x, None, cfg.window)
    cap = capacity(20, cfg.top_k, cfg.window, 1.0)
    probs = route.logits_Tw.softmax(-1)
    assert (route.chosen_TK.sum(0) == cap).all()  # perfectly balanced by construction
    for j in range(cfg.window):  # the chosen tokens of slot j are its C highest scores
        best = probs[:, j].topk(cap).indices
        assert set(best.tolist()) == set(route.chosen_TK[:, j].nonzero().squeeze(1).tolist())
    torch.testing.assert_close(route.gates_TK, probs * route.chosen_TK)
    # gradient: through the gates of the chosen pairs to the router weights
    route.gates_TK.sum().backward()
    assert router.weight_LWD.grad[1].abs().sum() > 0


def test_unified_routing_mixes_token_and_expert_choice() -> None:
    torch.manual_seed(0)
    x = torch.randn(20, BASE.d_model)
    for alpha in (0.0, 0.5, 1.0):
        cfg = BASE.replace(routing="unified", routing_alpha=alpha)
        torch.manual_seed(0)
        router = Router(cfg)
        route, _ = router(0, x, None, cfg.window)
        z = route.logits_Tw.detach()
        score = alpha * z.softmax(-1) + (1 - alpha) * (20 / cfg.window) * z.softmax(0)
        best = set(score.reshape(-1).topk(20 * cfg.top_k).indices.tolist())
        assert set(route.chosen_TK.reshape(-1).nonzero().squeeze(1).tolist()) == best
        assert int(route.chosen_TK.sum()) == 20 * cfg.top_k
    with pytest.raises(ConfigError, match="model.routing"):
        BASE.replace(routing="expert", router="norm")
    with pytest.raises(ConfigError, match="model.expert_bias"):
        BASE.replace(routing="unified", expert_bias=True)


def test_expert_choice_model_output_is_the_sum_over_chosen_pairs() -> None:
    cfg = BASE.replace(routing="expert", router="trajectory", router_state_dim=8)
    torch.manual_seed(0)
    model = MoUEModel(cfg)
    seen = []
    handle = model.moe.register_forward_hook(lambda m, a, out: seen.append((a[1], out[0], out[1])))
    out = model(_tokens())
    handle.remove()
    for x, y, route in seen:
        pairs = [(t, int(route.ids_TK[t, j]), route.gates_TK[t, j]) for t in range(x.shape[0])
                 for j in range(cfg.window) if route.chosen_TK[t, j]]
        torch.testing.assert_close(y, _naive_moe(x, pairs, model.moe.pool), rtol=1e-5, atol=1e-6)
    assert out.stats.dropped_frac == 0
    assert count(cfg).n_params_active == count(BASE.replace(router="trajectory", router_state_dim=8)).n_params_active


# ------------------------------------------------------------------ per-layer load metrics


def test_load_metrics_maxvio_and_entropy() -> None:
    reach = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float)
    load = torch.tensor([[3.0, 3.0, 3.0, 0.0], [0.0, 6.0, 2.0, 1.0]])
    m = _load_metrics(load, reach)
    assert m["balance/maxvio/layer_0"] == pytest.approx(0.0)
    assert m["balance/load_entropy/layer_0"] == pytest.approx(1.0)
    assert m["balance/maxvio/layer_1"] == pytest.approx(6 / 3 - 1)
    p = torch.tensor([6.0, 2.0, 1.0]) / 9
    assert m["balance/load_entropy/layer_1"] == pytest.approx(float(-(p * p.log()).sum() / math.log(3)))
    # pool-wide: load per reaching layer (expert 1: 9 over 2 layers, 2: 5 / 2, 0: 3, 3: 1)
    per = torch.tensor([3.0, 4.5, 2.5, 1.0])
    assert m["balance/maxvio"] == pytest.approx(float(per.max() / per.mean() - 1))
    for name in m:
        assert is_tracked(name), name


def test_train_reports_the_load_metrics_at_every_mark(tmp_path) -> None:
    from moue import TrialConfig
    from moue.train import NullSink, train

    cfg = TrialConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "pool_size": 4, "window": 2,
                  "stride": 2, "top_k": 1, "expert_hidden": 16, "capacity_factor": 1.0},
        "train": {"tokens": 2048, "batch_tokens": 256, "seq_len": 16, "eval_every_tokens": 1024, "lr": 1e-3},
        "data": {"val_tokens": 512},
    })
    sink = NullSink()
    train(cfg, sink, cache_dir=tmp_path)
    marks = [m for _, m in sink.reports if "balance/maxvio" in m]
    assert len(marks) >= 2
    for m in marks:
        for layer in range(2):
            assert m[f"balance/maxvio/layer_{layer}"] >= 0
            assert 0 <= m[f"balance/load_entropy/layer_{layer}"] <= 1 + 1e-6
        assert 0 <= m["balance/dropped_frac"] < 1


# ------------------------------------------------------------------ iso-active matching by router state


def test_router_state_matching_keeps_expert_width() -> None:
    fixed = {"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4, "model.max_seq_len": 64,
             "model.top_k": 2, "model.expert_hidden": 64, "model.router_state_dim": 16, "train.seq_len": 64}
    space = ss.get_space("virtual_width")
    opts = {"families": ["layerwise", "moue", "rotational_trajectory"], "experts_per_layer": [4],
            "active_tol": 0.05}
    by_f = {(p["model.router"], p["model.balance"]): p for p in space.grid(fixed, {**opts, "match": "active"})}
    by_r = {(p["model.router"], p["model.balance"]): p for p in space.grid(fixed, {**opts, "match": "router_state"})}
    target = ss.active_params({**fixed, **by_f["softmax", "switch"]})
    for key in (("trajectory", "exposure"), ("trajectory", "switch")):
        f_pt, r_pt = {**fixed, **by_f[key]}, {**fixed, **by_r[key]}
        assert f_pt["model.expert_hidden"] < 64 and f_pt["model.router_state_dim"] == 16  # narrower experts
        assert r_pt["model.expert_hidden"] == 64 and 1 <= r_pt["model.router_state_dim"] < 16  # smaller state
        assert ss.active_params(r_pt) <= 1.05 * target
        bigger = {**r_pt, "model.router_state_dim": r_pt["model.router_state_dim"] + 1}
        assert ss.active_params(bigger) > 1.05 * target  # the largest state within the tolerance
        assert ss.total_params(r_pt) > ss.total_params(f_pt)  # the stored count keeps the experts


def test_ablation_families_change_one_component_each() -> None:
    fixed = {"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4, "model.max_seq_len": 64,
             "model.top_k": 2, "model.expert_hidden": 64, "model.router_state_dim": 16, "train.seq_len": 64}
    families = ["rotational", "rotational_clamped", "rotational_trajectory", "rotational_exposure", "moue"]
    points = ss.get_space("virtual_width").grid(fixed, {"families": families, "experts_per_layer": [4],
                                                        "active_tol": 0.05, "moue_layout": "clamped"})
    got = [(p["model.router"], p["model.balance"], p.get("model.window_layout", "ring")) for p in points]
    assert got == [("softmax", "switch", "ring"), ("softmax", "switch", "clamped"), ("trajectory", "switch", "ring"),
                   ("softmax", "exposure", "ring"), ("trajectory", "exposure", "clamped")]
    topo = {(p["model.pool_size"], p["model.window"], p["model.stride"]) for p in points}
    assert topo == {(16, 8, 4)}  # one topology: only the named component changes
