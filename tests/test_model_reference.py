"""Reference tests: the shared-pool model against independent implementations and hand formulas."""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F

from moue import (
    ConfigError, LayerwiseMoEModel, ModelConfig, MoUEModel, WindowSchedule, check_counts,
    convert_layerwise, count, layerwise_config,
)
from moue.balance import balance_loss
from moue.moe import ExpertPool, dispatch
from moue.router import norm_constant
from moue.topology import Topology, adjacent, grouped, layerwise, unipool

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16,
                   expert_hidden=16, top_k=2, pool_size=12, window=4, stride=4)


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().pow(2).mean()


@pytest.mark.parametrize("renorm", [True, False])
def test_layerwise_topology_equals_independent_per_layer_moe(renorm: bool) -> None:
    torch.manual_seed(0)
    src_cfg = layerwise_config(BASE.replace(router_renorm=renorm), 4)
    src = LayerwiseMoEModel(src_cfg)
    cfg, state = convert_layerwise(src.state_dict(), src_cfg, target_window=4)
    assert (cfg.pool_size, cfg.window, cfg.stride) == (12, 4, 4)
    model = MoUEModel(cfg)
    model.load_state_dict(state, strict=True)
    idx = torch.randint(0, 64, (2, 16))
    ref_logits = src(idx)
    logits = model(idx).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    _loss(ref_logits).backward()
    _loss(logits).backward()
    for l in range(3):
        blk = src.blocks[l].moe
        torch.testing.assert_close(model.moe.pool.w_in_PDF2.grad[4 * l:4 * l + 4], blk.w_in.grad,
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.moe.pool.w_out_PFD.grad[4 * l:4 * l + 4], blk.w_out.grad,
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.moe.router.weight_LWD.grad[l], blk.router.weight.grad,
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.blocks[l].attn.qkv.weight.grad, src.blocks[l].attn.qkv.weight.grad,
                                   atol=1e-6, rtol=1e-4)


def test_one_expert_top1_equals_dense_swiglu() -> None:
    torch.manual_seed(0)
    cfg = BASE.replace(pool_size=1, window=1, stride=0, top_k=1)
    dense_cfg = BASE.replace(ffn="dense", dense_hidden=cfg.expert_hidden)
    moe, dense = MoUEModel(cfg), MoUEModel(dense_cfg)
    state = {k: v for k, v in moe.state_dict().items() if not k.startswith("moe.")}
    for l in range(cfg.n_layers):
        state[f"blocks.{l}.mlp.w_in.weight"] = moe.moe.pool.w_in_PDF2[0].t()
        state[f"blocks.{l}.mlp.w_out.weight"] = moe.moe.pool.w_out_PFD[0].t()
    dense.load_state_dict(state, strict=True)
    idx = torch.randint(0, 64, (2, 16))
    out = moe(idx)
    torch.testing.assert_close(out.logits, dense(idx).logits, atol=1e-5, rtol=1e-5)
    _loss(out.logits).backward()
    assert model_router_grad_is_zero(moe)


def model_router_grad_is_zero(model: MoUEModel) -> bool:
    # one expert, renormalised top-1: the gate is exactly 1, so no gradient reaches the router
    return bool((model.moe.router.weight_LWD.grad == 0).all())


def naive_dispatch(x, ids, gates, w_in, w_out):
    f = w_out.shape[1]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = ids[t, slot]
            gate, up = (x[t] @ w_in[e]).split(f)
            y[t] = y[t] + gates[t, slot] * ((F.silu(gate) * up) @ w_out[e])
    return y


@pytest.mark.parametrize("D,Fh", [(8, 12), (12, 8)], ids=["gate_on_output", "gate_on_hidden"])
@pytest.mark.parametrize("P,K", [(1, 1), (5, 1), (8, 2), (16, 4)])
def test_grouped_dispatch_equals_naive_loop(P: int, K: int, D: int, Fh: int) -> None:
    """Values and every gradient; both places the gate can multiply (moue.grouped.gated_experts)."""
    torch.manual_seed(P * 10 + K)
    T = 24
    pool = ExpertPool(P, D, Fh, init_std=0.5)
    x = torch.randn(T, D, requires_grad=True)
    # uneven groups and, for P > K, empty groups: draw ids from the first half of the pool only
    choices = max(K, P // 2)
    ids = torch.stack([torch.randperm(choices)[:K] for _ in range(T)])
    gates = torch.rand(T, K, requires_grad=True)
    y = dispatch(x, ids, gates, pool)
    grad = torch.randn(T, D)
    y.backward(grad)
    got = (x.grad.clone(), gates.grad.clone(), pool.w_in_PDF2.grad.clone(), pool.w_out_PFD.grad.clone())
    x.grad = gates.grad = None
    w_in = pool.w_in_PDF2.detach().clone().requires_grad_()
    w_out = pool.w_out_PFD.detach().clone().requires_grad_()
    y_ref = naive_dispatch(x, ids, gates, w_in, w_out)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y_ref.backward(grad)
    for a, b in zip(got, (x.grad, gates.grad, w_in.grad, w_out.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    unused = [e for e in range(P) if e not in set(ids.flatten().tolist())]
    assert (got[2][unused] == 0).all() and (got[3][unused] == 0).all()


@pytest.mark.parametrize("D,Fh", [(8, 12), (12, 8)], ids=["gate_on_output", "gate_on_hidden"])
@pytest.mark.parametrize("needs", ["x", "gates", "w_in", "w_out", "weights", "x+w_out"])
def test_gated_experts_computes_only_the_gradients_asked_for(needs: str, D: int, Fh: int, monkeypatch) -> None:
    """Frozen inputs get no gradient and cost no matmul (counted); the others get the gradients of
    the all-trainable call."""
    import moue.grouped as grouped

    torch.manual_seed(1)
    S, P = 20, 4
    offs = torch.tensor([5, 5, 12, 20], dtype=torch.int32)  # one empty expert
    inputs = [torch.randn(S, D), torch.rand(S), 0.5 * torch.randn(P, D, 2 * Fh), 0.5 * torch.randn(P, Fh, D)]
    grad = torch.randn(S, D)
    full = [t.clone().requires_grad_() for t in inputs]
    grouped.gated_experts(*full, offs).backward(grad)
    names = ["x", "gates", "w_in", "w_out"]
    wanted = {"weights": {"w_in", "w_out"}, "x+w_out": {"x", "w_out"}}.get(needs, {needs})
    part = [t.clone().requires_grad_(n in wanted) for n, t in zip(names, inputs)]
    calls = []
    matmul = grouped._grouped_mm
    monkeypatch.setattr(grouped, "_grouped_mm", lambda *a, **k: calls.append(1) or matmul(*a, **k))
    y = grouped.gated_experts(*part, offs)
    forward = len(calls)
    y.backward(grad)
    for name, a, b in zip(names, part, full):
        if name in wanted:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert a.grad is None, name
    below = bool(wanted & {"x", "w_in"})  # the hidden activations' gradient is needed
    hidden = below or ("gates" in wanted and Fh < D)  # gate on the hidden: its gradient needs it too
    assert forward == 2 and len(calls) - forward == len(wanted - {"gates"}) + hidden, (forward, len(calls))


@pytest.mark.parametrize("router_init", ["zero", "copy"])
def test_conversion_gives_identical_logits_then_widens(router_init: str) -> None:
    torch.manual_seed(3)
    src_cfg = layerwise_config(BASE, 4)
    src = LayerwiseMoEModel(src_cfg)
    cfg, state = convert_layerwise(src.state_dict(), src_cfg, target_window=8, router_init=router_init)
    assert cfg.window == 8 and cfg.pool_size == 12
    model = MoUEModel(cfg)
    model.load_state_dict(state, strict=True)
    idx = torch.randint(0, 64, (2, 16))
    schedule = WindowSchedule(start=4, end=8, start_step=10, end_step=20)
    model.set_window(schedule.window_at(0))
    torch.testing.assert_close(model(idx).logits, src(idx), atol=1e-5, rtol=1e-5)
    model.set_window(schedule.window_at(20))
    assert not torch.allclose(model(idx).logits, src(idx), atol=1e-3)
    new_rows = model.moe.router.weight_LWD[:, 4:]
    assert (new_rows == 0).all() == (router_init == "zero")
    if router_init == "copy":  # layer 0's slot 4 is expert 4 = layer 1's expert 0
        torch.testing.assert_close(new_rows[0, 0], src.blocks[1].moe.router.weight[0])


def test_window_schedule() -> None:
    s = WindowSchedule(start=4, end=8, start_step=10, end_step=20)
    assert [s.window_at(t) for t in (0, 10, 11, 15, 19, 20, 100)] == [4, 4, 4, 6, 7, 8, 8]
    with pytest.raises(ConfigError, match="start"):
        WindowSchedule(start=9, end=8)
    with pytest.raises(ConfigError, match="target_window"):
        convert_layerwise({}, layerwise_config(BASE, 4), target_window=13)


@pytest.mark.parametrize("topo", [
    layerwise(4, 3), unipool(4, 8), grouped(4, 3, 2), adjacent(4, 3, 2),
    Topology(n_layers=4, pool_size=10, window=5, stride=3),
    Topology(n_layers=6, pool_size=12, window=4, stride=2, group=2),
], ids=["layerwise", "unipool", "grouped", "adjacent", "rotational", "grouped-rotation"])
@pytest.mark.parametrize("kind", ["switch", "pool", "exposure", "none"])
def test_balance_loss_is_its_coefficient_under_uniform_routing(topo: Topology, kind: str) -> None:
    L, w, P = topo.n_layers, topo.window, topo.pool_size
    ids = torch.tensor([topo.window_ids(l) for l in range(L)])
    uniform = torch.full((L, w), 1.0 / w)
    coef = 0.37
    loss = balance_loss(kind, coef, frac_Lw=uniform, prob_Lw=uniform, ids_Lw=ids, pool_size=P)
    expect = 0.0 if kind == "none" else coef
    torch.testing.assert_close(loss, torch.tensor(expect))
    if kind != "none":
        # routing everything to each layer's first slot is penalised
        skew = torch.zeros(L, w)
        skew[:, 0] = 1.0
        assert balance_loss(kind, coef, frac_Lw=skew, prob_Lw=skew, ids_Lw=ids, pool_size=P) > 1.5 * coef


def test_pool_loss_is_unipool_formula_when_windows_tile() -> None:
    topo = grouped(4, 3, 2)
    ids = torch.tensor([topo.window_ids(l) for l in range(4)])
    torch.manual_seed(0)
    frac = torch.rand(4, topo.window).softmax(-1)
    prob = torch.rand(4, topo.window).softmax(-1)
    fbar = torch.zeros(12).index_add(0, ids.flatten(), frac.flatten()) / 4
    pbar = torch.zeros(12).index_add(0, ids.flatten(), prob.flatten()) / 4
    loss = balance_loss("pool", 0.1, frac_Lw=frac, prob_Lw=prob, ids_Lw=ids, pool_size=12)
    torch.testing.assert_close(loss, 0.1 * 12 * (fbar * pbar).sum())
    prev = torch.full((12,), 1 / 12)
    loss_prev = balance_loss("pool", 0.1, frac_Lw=frac, prob_Lw=prob, ids_Lw=ids, pool_size=12,
                             prev_P=prev)
    torch.testing.assert_close(loss_prev, 0.1 * 12 * (prev * pbar).sum())


def test_exposure_depth_weights_reweight_layers() -> None:
    topo = Topology(n_layers=2, pool_size=4, window=4, stride=0)
    ids = torch.tensor([topo.window_ids(l) for l in range(2)])
    uniform = torch.full((2, 4), 0.25)
    skew = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    flat = balance_loss("exposure", 1.0, frac_Lw=uniform, prob_Lw=uniform, ids_Lw=ids, pool_size=4,
                        gamma_L=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(flat, torch.tensor(1.0))  # uniform stays at its coefficient
    args = dict(frac_Lw=skew, prob_Lw=skew, ids_Lw=ids, pool_size=4)
    light = balance_loss("exposure", 1.0, gamma_L=torch.tensor([1.0, 3.0]), **args)
    heavy = balance_loss("exposure", 1.0, gamma_L=torch.tensor([3.0, 1.0]), **args)
    assert heavy > light  # weighting the skewed layer up raises the loss
    cfg = BASE.replace(balance="exposure", balance_depth_weights=(1.0, 2.0, 3.0))
    assert MoUEModel(cfg)(torch.randint(0, 64, (1, 8))).aux_loss > 0


def test_z_loss_matches_definition() -> None:
    torch.manual_seed(0)
    cfg = BASE.replace(z_loss_coef=0.5, balance="none")
    model = MoUEModel(cfg)
    routes = []
    model.moe.register_forward_hook(lambda m, a, out: routes.append(out[1]))
    out = model(torch.randint(0, 64, (2, 16)))
    expect = 0.5 * torch.stack([torch.logsumexp(r.logits_Tw, -1).pow(2).mean() for r in routes]).mean()
    torch.testing.assert_close(out.aux_loss, expect)


def test_norm_constant_makes_selected_scores_about_one() -> None:
    w, k = 16, 2
    c = norm_constant(w, k)
    x = torch.randn(20000, w, generator=torch.Generator().manual_seed(5))
    y = torch.relu(x / x.norm(dim=1, keepdim=True))
    top = (c * y).topk(k, dim=1).values
    norm_top = top.pow(2).sum(1).sqrt()
    assert float(norm_top.mean()) == pytest.approx(1.0, abs=0.1)
    assert abs(float(norm_top.mean() / c) - 1.0) > 0.2  # without c the scores are not ~1
    assert norm_constant(1, 1) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- counting


def test_counting_matches_hand_formulas_softmax() -> None:
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32,
                      pool_size=8, window=4, stride=4, top_k=2, expert_hidden=32)
    c = check_counts(MoUEModel(cfg), cfg)
    D, L, V, f = 64, 2, 256, 32
    trunk = L * (4 * D * D + 2 * D) + D
    assert c.n_params_embedding == 2 * V * D
    assert c.n_params_total == trunk + 8 * 3 * D * f + L * 4 * D
    assert c.n_params_active == trunk + L * 2 * 3 * D * f + L * 4 * D
    assert c.flops_per_token == 6 * c.n_params_active + 6 * L * 32 * D + 6 * D * V
    assert (c.virtual_width, c.physical_width, c.reuse) == (8, 8, 1.0)
    assert c.log10_paths == pytest.approx(2 * math.log10(6))
    assert (c.exposure_min, c.exposure_max) == (1, 1)
    assert c.compute(1000) == 1000 * c.flops_per_token


def test_counting_matches_hand_formulas_trajectory_shared_experts() -> None:
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, pool_size=10,
                      window=5, stride=3, top_k=2, expert_hidden=16, n_shared=1,
                      router="trajectory", router_state_dim=8)
    c = check_counts(MoUEModel(cfg), cfg)
    D, L, R, P, w, f = 32, 3, 8, 10, 5, 16
    trunk = L * (4 * D * D + 2 * D) + D
    gru = 6 * R * R + 6 * R
    expert = 3 * D * f
    assert c.n_params_total == trunk + P * expert + L * expert + L * w * D + L * R * D + gru + P * R
    assert c.n_params_active == trunk + L * 2 * expert + L * expert + L * w * D + L * R * D + L * gru + L * w * R
    # windows 0-4, 3-7, 6-0 (wrapping): expert 0 in two layers, experts 3, 4, 6, 7 too, 1, 2, 5, 8, 9 once
    assert cfg.topology.exposure == (2, 1, 1, 2, 2, 1, 2, 2, 1, 1)
    assert (c.exposure_min, c.exposure_max, c.virtual_width, c.reuse) == (1, 2, 15, 1.5)


def test_check_counts_detects_a_wrong_count() -> None:
    cfg = BASE
    model = MoUEModel(cfg.replace(expert_hidden=20))
    with pytest.raises(AssertionError, match="counting is wrong"):
        check_counts(model, cfg)


@pytest.mark.parametrize("name,topo,expect", [
    # docs/MODEL.md section 1 table, L = 8 layers, E = 4 experts per layer
    ("layerwise", layerwise(8, 4), (32, 4, 4, 1)),
    ("unipool", unipool(8, 24), (24, 24, 0, 1)),
    ("grouped G=2", grouped(8, 4, 2), (32, 16, 16, 4)),
    ("ReXMoE r=2", adjacent(8, 4, 2), (32, 8, 4, 1)),
])
def test_model_md_topology_table(name, topo: Topology, expect) -> None:
    assert (topo.pool_size, topo.window, topo.stride, topo.group) == expect
    L = topo.n_layers
    assert topo.virtual_width == L * topo.window
    assert topo.reuse == pytest.approx(L * topo.window / topo.pool_size)
    assert min(topo.exposure) >= 1  # every table architecture reaches every expert
    if name == "layerwise":
        assert [topo.window_ids(l) for l in (0, 1, 7)] == [[0, 1, 2, 3], [4, 5, 6, 7], [28, 29, 30, 31]]
        assert topo.exposure == (1,) * 32
    if name == "grouped G=2":
        assert topo.window_ids(3) == list(range(16)) and topo.window_ids(4) == list(range(16, 32))
        assert topo.exposure == (4,) * 32
    if name == "ReXMoE r=2":
        assert topo.window_ids(7) == [28, 29, 30, 31, 0, 1, 2, 3]
        assert topo.exposure == (2,) * 32
    if name == "unipool":
        assert topo.exposure == (8,) * 24


def test_uneven_exposure_and_unreachable_experts() -> None:
    topo = Topology(n_layers=2, pool_size=10, window=3, stride=2)
    assert topo.exposure == (1, 1, 2, 1, 1, 0, 0, 0, 0, 0)
    assert topo.unreachable == 5
    with pytest.warns(UserWarning, match="5 of 10 experts are in no layer's window"):
        BASE.replace(n_layers=2, pool_size=10, window=3, stride=2)
    with pytest.raises(ConfigError, match="unreachable"):
        BASE.replace(n_layers=2, pool_size=10, window=3, stride=2, require_reachable=True)


# ---------------------------------------------------------------------------- validation

INVALID = [
    (dict(top_k=9, window=8, pool_size=16), "model.top_k (9) must be <= model.window (8)"),
    (dict(window=20, pool_size=16), "model.window (20) must be <= model.pool_size (16)"),
    (dict(stride=16, pool_size=16), "model.stride (16) must be in [0, model.pool_size (16))"),
    (dict(stride=-1), "model.stride (-1)"),
    (dict(group=0), "model.group (0) must be an integer >= 1"),
    (dict(top_k=0), "model.top_k (0) must be an integer >= 1"),
    (dict(n_heads=3), "model.n_heads (3) must divide d_model (128)"),
    (dict(d_model=12, n_heads=4), "model.n_heads (4) must leave an even head size"),
    (dict(expert_hidden=30), "model.expert_hidden (30) must be a multiple of 4"),
    (dict(router="gru"), "model.router ('gru') must be one of softmax, norm, trajectory"),
    (dict(balance="aux"), "model.balance ('aux') must be one of switch, pool, exposure, none"),
    (dict(ffn="sparse"), "model.ffn ('sparse') must be one of moe, dense"),
    (dict(balance_coef=-0.1), "model.balance_coef (-0.1) must be a number >= 0"),
    (dict(n_shared=-1), "model.n_shared (-1) must be an integer >= 0"),
    (dict(n_layers=2.5), "model.n_layers (2.5) must be an integer >= 1"),
    (dict(dispatch="cuda"), "model.dispatch ('cuda') must be one of auto, grouped_mm, triton"),
    (dict(balance="exposure", balance_depth_weights=(1.0, 2.0)), "model.balance_depth_weights ((1.0, 2.0)) must be empty or 4"),
    (dict(balance="switch", balance_depth_weights=(1.0,) * 4), "model.balance_depth_weights ((1.0, 1.0, 1.0, 1.0)) applies only"),
]


@pytest.mark.parametrize("changes,message", INVALID, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(INVALID)])
def test_invalid_configs_name_the_field(changes, message) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(**changes)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert err.value.field == message.split(" ")[0]


def test_from_dict_rejects_unknown_keys_and_coerces_numbers() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.pool (8) is not a model setting")):
        ModelConfig.from_dict({"pool": 8})
    with pytest.raises(ConfigError, match="must be true or false"):
        ModelConfig.from_dict({"router_shared": "yes"})
    cfg = ModelConfig.from_dict({"balance_coef": 1, "pool_size": 16.0})
    assert cfg.balance_coef == 1.0 and isinstance(cfg.pool_size, int)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_count_is_the_same_for_every_router_without_building() -> None:
    for router in ("softmax", "norm", "trajectory"):
        for shared in (False, True):
            cfg = BASE.replace(router=router, router_shared=shared, n_shared=1, router_state_dim=8)
            assert count(cfg) == check_counts(MoUEModel(cfg), cfg)


@pytest.mark.parametrize("router_init", ["zero", "copy"])
def test_widen_layerwise_moue_checkpoint(router_init: str) -> None:
    from moue.convert import widen_layerwise

    torch.manual_seed(4)
    base = layerwise_config(BASE.replace(expert_bias=True), 4)
    model = MoUEModel(base)
    with torch.no_grad():
        model.moe.router.bias_LW.uniform_(-0.01, 0.01)
    idx = torch.randint(0, 64, (2, 16))
    before = model(idx).logits
    cfg, state = widen_layerwise(model.state_dict(), base, target_window=8, router_init=router_init)
    wide = MoUEModel(cfg)
    wide.load_state_dict(state, strict=True)
    wide.set_window(4)
    torch.testing.assert_close(wide(idx).logits, before, atol=1e-6, rtol=1e-6)
    rows = wide.moe.router.weight_LWD[2, 4:]  # layer 2's new slots: experts 12.. = layer 0's (ring wraps)
    if router_init == "copy":
        torch.testing.assert_close(rows, model.moe.router.weight_LWD[0])
    else:
        assert (rows == 0).all()
    with pytest.raises(ConfigError, match="must be a layerwise MoE"):
        rotational = BASE.replace(pool_size=8, stride=2)
        widen_layerwise(MoUEModel(rotational).state_dict(), rotational, target_window=8)


def test_fused_rope_and_rmsnorm_equal_the_composite_ops_with_their_gradients() -> None:
    """``moue.fused``'s hand-written backwards against autograd through the composite ops (float64,
    ``gradcheck``), on the strided views the attention block hands them; and a whole model's logits
    and gradients, eager path against the composite one."""
    from moue.fused import RMSNorm, _RMSNorm, _Rope, rope_reference
    from moue.model import rope_tables

    torch.manual_seed(0)
    B, S, H, d = 2, 5, 3, 8
    qkv = torch.randn(B, S, 3, H, d, dtype=torch.float64, requires_grad=True)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # [B, H, S, d], strided as in Attention
    cos, sin = (t.double() for t in rope_tables(S, d, 100.0))
    torch.autograd.gradcheck(lambda x: _Rope.apply(x, cos, sin), (q,))
    g = torch.randn(B, H, S, d, dtype=torch.float64)
    ours = torch.autograd.grad((_Rope.apply(q, cos, sin) * g).sum(), qkv)[0]
    ref = torch.autograd.grad((rope_reference(q, cos, sin) * g).sum(), qkv)[0]
    torch.testing.assert_close(_Rope.apply(q, cos, sin), rope_reference(q, cos, sin), rtol=0, atol=1e-14)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-14)

    x = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-5), (x, w))
    norm = RMSNorm(16, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), w, 1e-5), rtol=0, atol=1e-14)

    cfg = BASE.replace(router="trajectory", router_state_dim=8, balance="exposure")
    model = MoUEModel(cfg)
    idx = torch.randint(0, 64, (2, 16))

    def logits_and_grads(fused: bool) -> list[torch.Tensor]:
        from moue.fused import composite

        model.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if fused else composite():
            logits = model(idx).logits
        _loss(logits).backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    for a, b in zip(logits_and_grads(True), logits_and_grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_functions_fall_back_to_the_composite_ops_where_they_do_not_apply() -> None:
    """Autocast, low-precision RMSNorm inputs, ``torch.func`` transforms and meta tensors take the
    composite ops (``moue.fused`` module docstring); plain fp32 takes the fused functions."""
    from moue.fused import RMSNorm, apply_rope, composite
    from moue.model import rope_tables

    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    cos, sin = rope_tables(5, 8, 100.0)
    norm = RMSNorm(8, eps=1e-5)
    assert type(apply_rope(x, cos, sin).grad_fn).__name__ == "_RopeBackward"
    assert type(norm(x).grad_fn).__name__ == "_RMSNormBackward"
    with composite():  # what moue bench train --composite compares against
        assert type(apply_rope(x, cos, sin).grad_fn).__name__ == "CatBackward0"
        assert not type(norm(x).grad_fn).__name__.startswith("_RMSNorm")
    assert type(apply_rope(x, cos, sin).grad_fn).__name__ == "_RopeBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(apply_rope(x, cos, sin).grad_fn).__name__ == "CatBackward0"
        assert not type(norm(x).grad_fn).__name__.startswith("_RMSNorm")
    low = RMSNorm(8, eps=1e-5).to(torch.bfloat16)
    xb = x.detach().bfloat16().requires_grad_()
    assert not type(low(xb).grad_fn).__name__.startswith("_RMSNorm")
    low(xb).sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    g = torch.func.grad(lambda t: norm(apply_rope(t, cos, sin)).square().sum())(x.detach())
    torch.testing.assert_close(g, torch.autograd.grad(norm(apply_rope(x, cos, sin)).square().sum(), x)[0])
    assert apply_rope(torch.empty(2, 3, 5, 8, device="meta"), cos.to("meta"), sin.to("meta")).shape == (2, 3, 5, 8)
