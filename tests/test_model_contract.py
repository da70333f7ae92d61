"""Contract suite: every router x balance loss x topology must pass these (docs/MODEL.md 1-5)."""

from __future__ import annotations

import itertools

import pytest
import torch

from moue import ModelConfig, MoUEModel
from moue.topology import adjacent, grouped, layerwise, unipool

L = 4
TOPOLOGIES = {
    # name: (P, w, s, g) for L = 4 layers
    "layerwise": layerwise(L, 3),
    "unipool": unipool(L, 8),
    "grouped": grouped(L, 3, 2),
    "adjacent": adjacent(L, 3, 2),
    "rotational": None,  # P=10, w=5, s=3: windows wrap and exposure is uneven
    "clamped": "clamped",  # P=10, w=5, s=3 without wrapping: the last windows stop at the pool's end
}
ROUTERS = {
    "softmax": dict(router="softmax"),
    "softmax-raw": dict(router="softmax", router_renorm=False),
    "norm": dict(router="norm"),
    "trajectory": dict(router="trajectory", router_state_dim=8),
    "softmax-shared-bias": dict(router="softmax", router_shared=True, expert_bias=True),
    "trajectory-shared": dict(router="trajectory", router_shared=True, router_state_dim=8),
}
BALANCES = ("switch", "pool", "exposure", "none")


def make_cfg(topology: str, router: str, balance: str) -> ModelConfig:
    topo = TOPOLOGIES[topology]
    if topo is None or topo == "clamped":
        ring = dict(pool_size=10, window=5, stride=3, group=1, window_layout="clamped" if topo else "ring")
    else:
        ring = dict(pool_size=topo.pool_size, window=topo.window, stride=topo.stride, group=topo.group)
    return ModelConfig(vocab_size=64, d_model=32, n_layers=L, n_heads=2, max_seq_len=16,
                       expert_hidden=16, top_k=2, balance=balance, **ring, **ROUTERS[router])


def run(model: MoUEModel, idx: torch.Tensor):
    """Forward, recording each layer's route through a hook on the shared MoE module."""
    routes = []
    handle = model.moe.register_forward_hook(lambda mod, args, out: routes.append(out[1]))
    try:
        out = model(idx)
    finally:
        handle.remove()
    return out, routes


CASES = list(itertools.product(TOPOLOGIES, ROUTERS, BALANCES))


@pytest.mark.parametrize("topology,router,balance", CASES, ids=["-".join(c) for c in CASES])
def test_contract(topology: str, router: str, balance: str) -> None:
    torch.manual_seed(0)
    cfg = make_cfg(topology, router, balance)
    model = MoUEModel(cfg)
    B, S, T, K = 2, 16, 32, cfg.top_k
    idx = torch.randint(0, cfg.vocab_size, (B, S))
    out, routes = run(model, idx)

    # shapes
    assert out.logits.shape == (B, S, cfg.vocab_size)
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss)
    assert out.stats.load_LP.shape == (L, cfg.pool_size)
    assert out.stats.entropy_L.shape == (L,) and out.stats.lse_L.shape == (L,)
    assert len(routes) == L

    topo = cfg.topology
    for layer, route in enumerate(routes):
        window = set(topo.window_ids(layer))
        ids = route.ids_TK
        # selected experts always inside the layer's window, k distinct per token: none dropped
        assert set(ids.unique().tolist()) <= window
        assert ids.shape == (T, K)
        assert all(len(set(row)) == K for row in ids.tolist())
        assert int(out.stats.load_LP[layer].sum()) == T * K
        assert set(out.stats.load_LP[layer].nonzero().flatten().tolist()) == set(ids.unique().tolist())
        # gates as specified
        gates = route.gates_TK
        selected_probs = route.probs_Tw.gather(1, route.slots_TK)
        if cfg.router == "norm":
            unit = route.logits_Tw / (route.logits_Tw.norm(dim=-1, keepdim=True) + 1e-6)
            expect = model.moe.router.sigma * model.moe.router.norm_c * torch.relu(unit)
            torch.testing.assert_close(gates, expect.gather(1, route.slots_TK))
        elif cfg.router_renorm:
            torch.testing.assert_close(gates.sum(-1), torch.ones(T))
            torch.testing.assert_close(gates, selected_probs / selected_probs.sum(-1, keepdim=True))
        else:
            torch.testing.assert_close(gates, selected_probs)
        # without a bias, the selected experts are the top-k scores of the window
        if not cfg.expert_bias:
            scores = expect if cfg.router == "norm" else route.probs_Tw
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, route.slots_TK, True)
            best_other = scores.masked_fill(chosen, float("-inf")).max(-1).values
            assert (scores.gather(1, route.slots_TK).min(-1).values >= best_other - 1e-6).all()

    # gradients reach exactly the experts that were used (with a nonzero gate), no other
    loss = out.logits.float().pow(2).mean() + out.aux_loss
    loss.backward()
    used = set()
    for route in routes:
        nz = route.gates_TK.detach() != 0
        used |= set(route.ids_TK[nz].tolist())
    pool = model.moe.pool
    grad_rows = (pool.w_in_PDF2.grad.abs().sum((1, 2)) > 0) | (pool.w_out_PFD.grad.abs().sum((1, 2)) > 0)
    assert set(grad_rows.nonzero().flatten().tolist()) == used
    reachable = {j for j, n in enumerate(topo.exposure) if n > 0}
    assert used <= reachable

    # eval mode changes no balancing state
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        model(idx)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"eval forward changed {name}"


def test_training_forward_updates_pool_statistic() -> None:
    """The eval check above can fail: a training forward does change the pool loss's state."""
    cfg = make_cfg("rotational", "softmax", "pool")
    model = MoUEModel(cfg)
    before = model.moe.prev_fbar_P.clone()
    model(torch.randint(0, 64, (2, 16)))
    assert not torch.equal(before, model.moe.prev_fbar_P)
    torch.testing.assert_close(model.moe.prev_fbar_P.sum(), torch.tensor(1.0))


def test_outside_window_logits_do_not_influence_selection() -> None:
    """Changing the router rows / keys of experts outside a layer's window changes nothing."""
    torch.manual_seed(1)
    cfg = make_cfg("rotational", "trajectory-shared", "switch")
    model = MoUEModel(cfg)
    idx = torch.randint(0, 64, (2, 16))
    _, routes_a = run(model, idx)
    window0 = set(cfg.topology.window_ids(0))
    outside = [j for j in range(cfg.pool_size) if j not in window0]
    with torch.no_grad():
        model.moe.router.weight_PD[outside] += 10.0
        model.moe.router.keys_PR[outside] -= 10.0
    _, routes_b = run(model, idx)
    assert torch.equal(routes_a[0].ids_TK, routes_b[0].ids_TK)
    torch.testing.assert_close(routes_a[0].gates_TK, routes_b[0].gates_TK)


def test_expert_bias_update_moves_toward_underloaded() -> None:
    cfg = make_cfg("rotational", "softmax-shared-bias", "none")
    model = MoUEModel(cfg)
    load = torch.tensor([[10.0, 0.0, 5.0, 5.0, 5.0]] * L)
    model.moe.router.update_bias(load)
    bias = model.moe.router.bias_LW[0]
    rate = cfg.expert_bias_rate
    torch.testing.assert_close(bias, torch.tensor([-rate, rate, 0.0, 0.0, 0.0]))
    # a large bias on one slot makes every token select it, although gates stay unbiased
    with torch.no_grad():
        model.moe.router.bias_LW[:, 1] = 100.0
    _, routes = run(model, torch.randint(0, 64, (2, 16)))
    assert (routes[0].slots_TK == 1).any(dim=-1).all()
    torch.testing.assert_close(routes[0].gates_TK.sum(-1), torch.ones(32))


def test_trajectory_state_is_carried_across_depth() -> None:
    """The trajectory router's layer-2 decision depends on layer-1's input (the GRU state)."""
    torch.manual_seed(2)
    cfg = make_cfg("unipool", "trajectory", "none")
    model = MoUEModel(cfg)
    x = torch.randn(8, cfg.d_model)
    router = model.moe.router
    state = router.initial_state(x)
    r1, s1 = router(0, x, state, cfg.window)
    r2, _ = router(1, x, s1, cfg.window)
    r2_fresh, _ = router(1, x, state, cfg.window)
    assert not torch.allclose(r2.logits_Tw, r2_fresh.logits_Tw)
    assert s1.shape == (8, cfg.router_state_dim)


def test_pool_loss_uses_the_previous_micro_batch_statistic() -> None:
    """UniPool's default: the second batch's loss pairs its probabilities with the first batch's
    load fractions (not its own)."""
    from moue.balance import balance_loss

    torch.manual_seed(3)
    cfg = make_cfg("rotational", "softmax", "pool")
    model = MoUEModel(cfg)
    model(torch.randint(0, 64, (2, 16)))
    first_fbar = model.moe.prev_fbar_P.clone()
    out, routes = run(model, torch.randint(0, 64, (2, 16)))
    P, w = cfg.pool_size, cfg.window
    frac = torch.stack([r.slots_TK.reshape(-1).bincount(minlength=w) for r in routes]).float() / 32 / cfg.top_k
    prob = torch.stack([r.balance_Tw.mean(0) for r in routes])
    ids = torch.stack([r.window_ids_w for r in routes])
    kw = dict(frac_Lw=frac, prob_Lw=prob, ids_Lw=ids, pool_size=P)
    with_prev = balance_loss("pool", cfg.balance_coef, prev_P=first_fbar, **kw)
    with_own = balance_loss("pool", cfg.balance_coef, **kw)
    assert not torch.allclose(with_prev, with_own)  # the two batches route differently
    torch.testing.assert_close(out.stats.balance_loss, with_prev.detach())
