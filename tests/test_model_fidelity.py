"""Fidelity (issue 12): each mechanism does what its name promises, checked against independent
reference implementations and finite differences, gradients included.

The references here are written from docs/MODEL.md's formulas with explicit loops and the GRU's
equations spelled out; they share no code with ``moue_core`` beyond the parameters they read.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.func import functional_call

from moue import ConfigError, LayerwiseMoEModel, ModelConfig, MoUEModel, convert_layerwise, layerwise_config
from moue.balance import balance_loss, pooled_statistic, z_loss
from moue.convert import widen_layerwise
from moue.counting import check_counts, count
from moue.router import Router, norm_constant
from moue.topology import Topology, adjacent, grouped, layerwise, unipool
from moue.trial_config import TrialConfig

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, expert_hidden=16,
                   top_k=2, pool_size=10, window=5, stride=3)


# ------------------------------------------------------------------ independent references


def ref_gru(x, h, cell):
    """``torch.nn.GRUCell``'s equations (gates r, z, n stacked in that order)."""
    w_ir, w_iz, w_in = cell.weight_ih.chunk(3)
    w_hr, w_hz, w_hn = cell.weight_hh.chunk(3)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    return (1 - z) * n + z * h


def ref_routes(router: Router, xs: list[torch.Tensor], window: int) -> list[dict]:
    """docs/MODEL.md section 2 for per-layer router inputs ``xs``: slots sorted ascending."""
    cfg = router.cfg
    topo = cfg.topology
    h, out = None, []
    for l, x in enumerate(xs):
        ids = torch.tensor(topo.window_ids(l, window))
        weight = router.weight_PD[ids] if cfg.router_shared else router.weight_LWD[l, :window]
        z = x @ weight.T
        if cfg.router == "trajectory":
            h = x.new_zeros(x.shape[0], cfg.router_state_dim) if h is None else h
            h = ref_gru(x @ router.proj_LRD[l].T, h, router.gru)  # the state carried from layer l-1
            z = z + h @ router.keys_PR[ids].T  # universal keys: by pool id
        balance = None
        if cfg.router == "norm":
            score = router.sigma * norm_constant(window, cfg.top_k) * torch.relu(z / (z.norm(dim=-1, keepdim=True) + 1e-6))
        elif cfg.router == "sigmoid":  # DeepSeek-V3: sigmoid scores, balance on them normalised per token
            score = torch.sigmoid(z)
            balance = score / score.sum(dim=-1, keepdim=True)
        else:
            score = torch.softmax(z, dim=-1)
        bias = 0.0
        if cfg.expert_bias:  # per layer slot, or per pool expert (read through the window's ids)
            bias = router.bias_P[ids] if cfg.expert_bias_scope == "pool" else router.bias_LW[l, :window]
        select = score.detach() + bias
        slots = select.argsort(dim=-1, descending=True)[:, :cfg.top_k].sort(dim=-1).values
        gates = score.gather(1, slots)  # unbiased scores: the bias only selects
        if cfg.router != "norm" and cfg.router_renorm:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        out.append(dict(ids=ids, slots=slots, gates=gates, balance=score if balance is None else balance, logits=z))
    return out


def gate_map(slots: torch.Tensor, gates: torch.Tensor, w: int = BASE.window) -> torch.Tensor:
    """Gates scattered to ``[T, w]`` (zero for unselected slots)."""
    return gates.new_zeros(gates.shape[0], w).scatter(1, slots, gates)


def sorted_route(route) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``Route``'s slots ascending and its gates in that order."""
    slots, order = route.slots_TK.sort(dim=-1)
    return slots, route.gates_TK.gather(1, order)


def ref_balance(kind, coef, frac, prob, ids, P, *, prev=None, gamma=None):
    """The balance losses of docs/MODEL.md section 3 (and balance.py's docstring) with loops."""
    L, w = frac.shape
    if kind == "none":
        return prob.sum() * 0
    if kind == "switch":
        return coef * sum(w * sum(frac[l, j] * prob[l, j] for j in range(w)) for l in range(L)) / L
    g = [1.0] * L if gamma is None else [float(v) for v in gamma]
    reach = {p: [(l, j) for l in range(L) for j in range(w) if int(ids[l, j]) == p] for p in range(P)}
    if kind == "pool":
        fbar = {p: sum(frac[l, j] for l, j in reach[p]) / L for p in range(P)}
        if prev is not None:
            fbar = {p: prev[p] for p in range(P)}
        pbar = {p: sum(prob[l, j] for l, j in reach[p]) / L for p in range(P)}
        norm = sum((len(reach[p]) / (L * w)) ** 2 for p in range(P))
        return coef * sum(fbar[p] * pbar[p] for p in range(P) if reach[p]) / norm
    # exposure
    r = {}
    for p in range(P):
        if reach[p]:
            r[p] = w * sum(g[l] * frac[l, j] for l, j in reach[p]) / sum(g[l] for l, _ in reach[p])
    if prev is not None:
        r = {p: prev[p] for p in range(P)}
    total = 0.0
    for l in range(L):
        total = total + g[l] * sum(math.sqrt(float(r[int(ids[l, j])] * w * frac[l, j])) * prob[l, j] for j in range(w))
    return coef * total / sum(g)


def ref_aux(cfg: ModelConfig, refs: list[dict], routes, T: int, prev=None) -> torch.Tensor:
    """Balance + z-loss of one forward from reference routes; the load fractions (no gradient) count
    the model's selected slots, since NormRouter's choice among tied zero scores is arbitrary."""
    w = refs[0]["balance"].shape[1]
    frac = torch.stack([r.slots_TK.reshape(-1).bincount(minlength=w) for r in routes]) / (T * cfg.top_k)
    prob = torch.stack([r["balance"].mean(0) for r in refs])
    frac = frac.to(prob.dtype)
    ids = torch.stack([r["ids"] for r in refs])
    gamma = cfg.balance_depth_weights or None
    bal = ref_balance(cfg.balance, cfg.balance_coef, frac, prob, ids, cfg.pool_size, prev=prev, gamma=gamma)
    zl = cfg.z_loss_coef * sum(torch.logsumexp(r["logits"], -1).pow(2).mean() for r in refs) / len(refs)
    return bal + zl


def capture(model: MoUEModel, idx: torch.Tensor):
    """Forward, keeping each MoE layer's router input (in the graph) and its route."""
    xs, routes = [], []

    def hook(module, args, out):
        xs.append(args[1])
        routes.append(out[1])

    handle = model.moe.register_forward_hook(hook)
    try:
        out = model(idx)
    finally:
        handle.remove()
    return out, xs, routes


ROUTERS = {
    "softmax": dict(router="softmax"),
    "softmax-raw": dict(router="softmax", router_renorm=False),
    "norm": dict(router="norm"),
    "norm-bias": dict(router="norm", expert_bias=True),
    "trajectory": dict(router="trajectory", router_state_dim=8),
    "trajectory-shared": dict(router="trajectory", router_state_dim=8, router_shared=True),
    "softmax-shared-bias": dict(router="softmax", router_shared=True, expert_bias=True),
    "sigmoid": dict(router="sigmoid"),
    "sigmoid-bias": dict(router="sigmoid", expert_bias=True),
    "sigmoid-pool-bias": dict(router="sigmoid", expert_bias=True, expert_bias_scope="pool"),
}


def _randomise_bias(router: Router) -> None:
    with torch.no_grad():
        (router.bias_P if router.cfg.expert_bias_scope == "pool" else router.bias_LW).uniform_(-0.05, 0.05)


def _model(**changes) -> MoUEModel:
    """A float32 model (the CPU grouped matmul has no float64) with a bias that moves the selection
    (a zero bias would hide a leak into the gates)."""
    torch.manual_seed(0)
    model = MoUEModel(BASE.replace(**changes))
    if model.cfg.expert_bias:
        _randomise_bias(model.moe.router)
    return model


def _router(**changes) -> Router:
    """A float64 router alone (finite differences), with a nonzero bias."""
    torch.manual_seed(0)
    router = Router(BASE.replace(**changes)).double()
    if router.cfg.expert_bias:
        _randomise_bias(router)
    return router


TOL = dict(rtol=1e-5, atol=1e-6)  # float32 model against a reference fed the same inputs


# ------------------------------------------------------------------ routers: values and gradients


@pytest.mark.parametrize("name", ROUTERS)
def test_model_routes_equal_the_reference_router(name: str) -> None:
    """Every layer's selection, gates and balance scores equal the reference fed with the layer's
    actual input: catches a trajectory state not carried between layers, keys indexed by window
    slot, an expert bias leaking into the gates."""
    model = _model(**ROUTERS[name])
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    _, xs, routes = capture(model, idx)
    refs = ref_routes(model.moe.router, xs, model.moe.window)
    for layer, (route, ref) in enumerate(zip(routes, refs)):
        slots, gates = sorted_route(route)
        if model.cfg.router != "norm":  # NormRouter: ties among zero scores may pick either (gate 0)
            assert torch.equal(slots, ref["slots"]), f"layer {layer}: selection"
        assert torch.equal(route.window_ids_w, ref["ids"]), f"layer {layer}: window"
        torch.testing.assert_close(gate_map(slots, gates), gate_map(ref["slots"], ref["gates"]), **TOL,
                                   msg=f"layer {layer}: gates")
        torch.testing.assert_close(route.logits_Tw, ref["logits"], **TOL)
        torch.testing.assert_close(route.balance_Tw, ref["balance"], **TOL)


@pytest.mark.parametrize("name", ROUTERS)
def test_router_gradients_equal_reference_and_finite_differences(name: str) -> None:
    """d(gates, balance scores, logits) / d(router parameters): autograd against the reference's
    autograd and against central finite differences (float64, selection fixed)."""
    router = _router(**ROUTERS[name], d_model=8, n_heads=2)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(BASE.n_layers)]
    weights = [torch.randn(6, BASE.window, generator=g, dtype=torch.float64) for _ in range(3)]
    names = [n for n, p in router.named_parameters()]

    def objective_model(*params):
        values = dict(zip(names, params))
        state, total = router.initial_state(xs[0]), 0.0
        for layer, x in enumerate(xs):
            route, state = functional_call(router, values, (layer, x, state, BASE.window))
            gates = gate_map(route.slots_TK, route.gates_TK)
            total = total + (gates * weights[0]).sum() + (route.balance_Tw * weights[1]).sum()
            total = total + (route.logits_Tw * weights[2]).sum()
        return total

    params = tuple(p.detach().clone().requires_grad_() for p in router.parameters())
    got = torch.autograd.grad(objective_model(*params), params)

    def objective_ref():
        total = 0.0
        for ref in ref_routes(router, xs, BASE.window):
            total = total + (gate_map(ref["slots"], ref["gates"]) * weights[0]).sum() + (ref["balance"] * weights[1]).sum()
            total = total + (ref["logits"] * weights[2]).sum()
        return total

    want = torch.autograd.grad(objective_ref(), list(router.parameters()))
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=n)  # norm_c is stored in fp32
        assert b.abs().sum() > 0, n  # every parameter is reached
    assert torch.autograd.gradcheck(objective_model, params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_trajectory_router_gru_uses_init_std() -> None:
    cfg = ModelConfig(router="trajectory", router_state_dim=64, init_std=0.02)
    torch.manual_seed(0)
    gru = Router(cfg).gru
    for w in (gru.weight_ih, gru.weight_hh):
        assert float(w.detach().std()) == pytest.approx(0.02, rel=0.05)  # PyTorch's default would be ~0.072
    assert (gru.bias_ih == 0).all() and (gru.bias_hh == 0).all()


def test_routing_runs_in_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    for name in ("softmax", "norm", "trajectory"):
        router = Router(BASE.replace(**ROUTERS[name]))
        x = torch.randn(64, BASE.d_model).to(torch.bfloat16)
        plain, s_plain = router(1, x.float(), router.initial_state(x.float()), BASE.window)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto, s_auto = router(1, x, router.initial_state(x), BASE.window)
        assert auto.logits_Tw.dtype == torch.float32 and auto.balance_Tw.dtype == torch.float32
        torch.testing.assert_close(auto.logits_Tw, plain.logits_Tw, rtol=0, atol=0)
        assert torch.equal(auto.slots_TK, plain.slots_TK)
        torch.testing.assert_close(auto.gates_TK.float(), plain.gates_TK.to(torch.bfloat16).float(), rtol=0, atol=0)


# ------------------------------------------------------------------ balance losses and z-loss


TOPOS = {
    "layerwise": layerwise(4, 3), "unipool": unipool(4, 8), "grouped": grouped(4, 3, 2),
    "adjacent": adjacent(4, 3, 2), "ring": Topology(n_layers=4, pool_size=10, window=5, stride=3),
    "clamped": Topology(n_layers=4, pool_size=10, window=5, stride=3, layout="clamped"),
    "ring-L6": Topology(n_layers=6, pool_size=24, window=8, stride=4),
    "clamped-L6": Topology(n_layers=6, pool_size=24, window=8, stride=4, layout="clamped"),
    "grouped-rotation": Topology(n_layers=6, pool_size=12, window=4, stride=2, group=2),
}


def _stats(topo: Topology, seed: int):
    g = torch.Generator().manual_seed(seed)
    L, w = topo.n_layers, topo.window
    frac = torch.rand(L, w, generator=g, dtype=torch.float64).mul(4).softmax(-1)
    prob = torch.rand(L, w, generator=g, dtype=torch.float64).mul(3).softmax(-1)
    ids = torch.tensor([topo.window_ids(l) for l in range(L)])
    return frac, prob, ids


@pytest.mark.parametrize("topo", TOPOS.values(), ids=TOPOS.keys())
@pytest.mark.parametrize("gamma", [None, "ramp", "random"])
def test_uniform_routing_gives_exactly_the_coefficient(topo: Topology, gamma) -> None:
    L, w, P = topo.n_layers, topo.window, topo.pool_size
    ids = torch.tensor([topo.window_ids(l) for l in range(L)])
    uniform = torch.full((L, w), 1.0 / w, dtype=torch.float64)
    gammas = {None: None, "ramp": torch.arange(1.0, L + 1, dtype=torch.float64),
              "random": torch.rand(L, generator=torch.Generator().manual_seed(L), dtype=torch.float64) + 0.1}[gamma]
    kinds = ("exposure",) if gamma else ("switch", "pool", "exposure")
    for kind in kinds:
        loss = balance_loss(kind, 0.37, frac_Lw=uniform, prob_Lw=uniform, ids_Lw=ids, pool_size=P, gamma_L=gammas)
        torch.testing.assert_close(loss, torch.tensor(0.37, dtype=torch.float64), rtol=1e-12, atol=0)


def test_issue_depth_weight_case_is_exact() -> None:
    """L=4, P=10, w=5, s=3 with weights 1..4 gave 1.0409 instead of 1.0 before the fix."""
    topo = TOPOS["ring"]
    ids = torch.tensor([topo.window_ids(l) for l in range(4)])
    uniform = torch.full((4, 5), 0.2)
    loss = balance_loss("exposure", 1.0, frac_Lw=uniform, prob_Lw=uniform, ids_Lw=ids, pool_size=10,
                        gamma_L=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert float(loss) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("topo", ["ring", "clamped", "unipool", "grouped-rotation"])
@pytest.mark.parametrize("kind", ["switch", "pool", "exposure", "exposure-gamma", "pool-prev", "exposure-prev"])
def test_balance_loss_value_and_gradient_equal_reference(topo: str, kind: str) -> None:
    """Value and d loss / d prob against the loop reference, and gradcheck (finite differences)."""
    topo_ = TOPOS[topo]
    frac, prob, ids = _stats(topo_, seed=len(kind) + topo_.pool_size)
    P, L = topo_.pool_size, topo_.n_layers
    base = kind.split("-")[0]
    gamma = torch.arange(1.0, L + 1, dtype=torch.float64) if kind.endswith("gamma") else None
    prev = None
    if kind.endswith("prev"):
        other, _, _ = _stats(topo_, seed=99)
        prev = pooled_statistic(base, other, ids, P)
    prob = prob.requires_grad_()
    got = balance_loss(base, 0.3, frac_Lw=frac, prob_Lw=prob, ids_Lw=ids, pool_size=P, prev_P=prev, gamma_L=gamma)
    want = ref_balance(base, 0.3, frac, prob, ids, P, prev=prev, gamma=gamma)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (g_got,) = torch.autograd.grad(got, prob)
    (g_want,) = torch.autograd.grad(want, prob)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)
    assert g_got.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda p: balance_loss(base, 0.3, frac_Lw=frac, prob_Lw=p, ids_Lw=ids, pool_size=P, prev_P=prev,
                               gamma_L=gamma), (prob,))


def test_z_loss_gradient_equals_finite_differences() -> None:
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def fn(*zs):
        return z_loss(0.3, [torch.logsumexp(z, -1) for z in zs])

    assert torch.autograd.gradcheck(fn, tuple(logits))
    want = 0.3 * sum(torch.logsumexp(z, -1).pow(2).mean() for z in logits) / 3
    torch.testing.assert_close(fn(*logits), want)


def test_exposure_differs_from_pool_at_uniform_exposure() -> None:
    """Every expert reachable from 2 layers (ring L=4, P=8, w=4, s=2): the old form equalled the
    pool loss here to 7 digits with the same gradient; the depth-aware form differs in both."""
    topo = Topology(n_layers=4, pool_size=8, window=4, stride=2)
    assert set(topo.exposure) == {2}
    frac, prob, ids = _stats(topo, seed=5)
    prob = prob.requires_grad_()
    kw = dict(frac_Lw=frac, ids_Lw=ids, pool_size=8)
    pool = balance_loss("pool", 1.0, prob_Lw=prob, **kw)
    exposure = balance_loss("exposure", 1.0, prob_Lw=prob, **kw)
    assert abs(float(pool.detach()) - float(exposure.detach())) > 1e-3
    (g_pool,) = torch.autograd.grad(pool, prob)
    (g_exp,) = torch.autograd.grad(exposure, prob)
    cosine = float((g_pool * g_exp).sum() / (g_pool.norm() * g_exp.norm()))
    assert cosine < 0.99, cosine
    # a layer that collapses onto one expert while the pool stays balanced: exposure charges it
    collapse = torch.zeros(4, 4, dtype=torch.float64)
    collapse[:, 0] = 1.0  # layer l uses expert 2l: each expert 0, 2, 4, 6 once, pooled load even over them
    even = torch.full((4, 4), 0.25, dtype=torch.float64)
    kw_c = dict(frac_Lw=collapse, prob_Lw=collapse, ids_Lw=ids, pool_size=8)
    assert balance_loss("exposure", 1.0, **kw_c) > balance_loss("exposure", 1.0, frac_Lw=even, prob_Lw=even,
                                                                   ids_Lw=ids, pool_size=8)


@pytest.mark.parametrize("balance", ["switch", "pool", "exposure", "none"])
@pytest.mark.parametrize("router", ["softmax", "norm", "trajectory"])
def test_model_aux_loss_value_and_gradient_equal_reference(balance: str, router: str) -> None:
    """The model's aux loss (balance + z-loss) against the reference computed from the same layer
    inputs: value and gradient on every router parameter (catches a detached loss anywhere)."""
    extra = dict(balance_depth_weights=(1.0, 2.0, 3.0, 4.0)) if balance == "exposure" else {}
    model = _model(**ROUTERS[router], balance=balance, balance_prev_batch=False, z_loss_coef=0.05, **extra)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    out, xs, routes = capture(model, idx)
    ref = ref_aux(model.cfg, ref_routes(model.moe.router, xs, model.moe.window), routes, T=16)
    torch.testing.assert_close(out.aux_loss, ref, **TOL)
    params = [p for _, p in model.moe.router.named_parameters()]
    got = torch.autograd.grad(out.aux_loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for (name, _), a, b in zip(model.moe.router.named_parameters(), got, want):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8, msg=name)
    assert sum(float(g.abs().sum()) for g in got if g is not None) > 0


def test_z_loss_and_balance_loss_each_reach_the_router() -> None:
    """Each term alone has a gradient on the router (a detached term would give exactly zero)."""
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    for changes in (dict(balance="none", z_loss_coef=0.1), dict(balance="switch", z_loss_coef=0.0),
                    dict(balance="pool", balance_prev_batch=False, z_loss_coef=0.0),
                    dict(balance="exposure", balance_prev_batch=False, z_loss_coef=0.0)):
        model = _model(**changes)
        (grad,) = torch.autograd.grad(model(idx).aux_loss, [model.moe.router.weight_LWD])
        assert grad.abs().sum() > 1e-8, changes


# ------------------------------------------------------------------ NormRouter's balance loss


@pytest.mark.parametrize("balance", ["pool", "switch", "exposure"])
def test_norm_router_balance_loss_ignores_the_scale_of_the_logits(balance: str) -> None:
    model = _model(router="norm", balance=balance, balance_prev_batch=False)
    trained = model.moe.router.weight_LWD.detach() * 10  # logits of order 1, as after training
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model.moe.router.weight_LWD.copy_(trained)
        _, xs, _ = capture(model, idx)
        for layer, x in enumerate(xs):  # slot 0 favoured in every layer: an imbalanced routing
            mean = x.mean(0)
            trained[layer, 0] += 4 * mean / mean.norm().pow(2)
        model.moe.router.weight_LWD.copy_(trained)
    out, _, routes = capture(model, idx)
    losses, softmax_losses = [], []
    for scale in (1.0, 0.5, 0.1):
        with torch.no_grad():
            model.moe.router.weight_LWD.copy_(trained * scale)
        out_s, _, routes_s = capture(model, idx)
        assert all(torch.equal(a.ids_TK, b.ids_TK) for a, b in zip(routes, routes_s))  # same selection
        losses.append(float(out_s.stats.balance_loss))
        frac = torch.stack([r.slots_TK.reshape(-1).bincount(minlength=5) for r in routes_s]).float() / 128
        ids = torch.stack([r.window_ids_w for r in routes_s])
        softmax_prob = torch.stack([r.probs_Tw.mean(0) for r in routes_s])
        softmax_losses.append(float(balance_loss(balance, 1e-2, frac_Lw=frac, prob_Lw=softmax_prob, ids_Lw=ids,
                                                 pool_size=10)))
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-4)
    assert softmax_losses[2] < 0.95 * softmax_losses[0]  # what the old loss on softmax(z) did


def test_norm_router_scale_gets_the_balance_gradient() -> None:
    """On fixed layer inputs the loss is linear in sigma: d loss / d sigma = loss / sigma (UniPool's
    formulation); in the model sigma also moves the later layers' inputs, but the gradient stays."""
    model = _model(router="norm", balance="pool", balance_prev_batch=False)
    router = model.moe.router
    with torch.no_grad():
        router.sigma.fill_(1.7)
    out, xs, _ = capture(model, torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8)))
    assert float(out.stats.z_loss) == 0.0  # NormRouter's default: no z-loss
    (in_model,) = torch.autograd.grad(out.aux_loss, [router.sigma])
    assert float(in_model) > 0
    routes = [router(layer, x.detach(), None, 5)[0] for layer, x in enumerate(xs)]
    frac = torch.stack([r.slots_TK.reshape(-1).bincount(minlength=5) for r in routes]).float() / 64
    prob = torch.stack([r.balance_Tw.mean(0) for r in routes])
    ids = torch.stack([r.window_ids_w for r in routes])
    loss = balance_loss("pool", 1e-2, frac_Lw=frac, prob_Lw=prob, ids_Lw=ids, pool_size=10)
    (grad,) = torch.autograd.grad(loss, [router.sigma])
    assert float(grad) == pytest.approx(float(loss) / 1.7, rel=1e-5)


# ------------------------------------------------------------------ previous-batch statistic


@pytest.mark.parametrize("balance", ["pool", "exposure"])
def test_no_pool_level_loss_before_a_previous_batch_exists(balance: str) -> None:
    model = _model(balance=balance, z_loss_coef=0.0)
    g = torch.Generator().manual_seed(9)
    first_idx, second_idx = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    first, _, routes1 = capture(model, first_idx)
    assert float(first.aux_loss) == 0.0 and not first.aux_loss.requires_grad  # UniPool: none on the first
    assert bool(model.moe.has_prev_fbar)
    frac1 = torch.stack([r.slots_TK.reshape(-1).bincount(minlength=5) for r in routes1]).float() / 32
    ids = torch.stack([r.window_ids_w for r in routes1])
    stat1 = pooled_statistic(balance, frac1, ids, 10)
    torch.testing.assert_close(model.moe.prev_fbar_P, stat1)
    second, xs, routes2 = capture(model, second_idx)
    ref = ref_aux(model.cfg, ref_routes(model.moe.router, xs, 5), routes2, T=16, prev=stat1)
    torch.testing.assert_close(second.aux_loss, ref, **TOL)
    assert float(second.aux_loss) > 0


# ------------------------------------------------------------------ z-loss defaults per router


def test_z_loss_default_is_the_router_s_reference() -> None:
    assert ModelConfig().z_loss_coef == 1e-3
    assert ModelConfig(router="trajectory").z_loss_coef == 1e-3
    norm = ModelConfig(router="norm")
    assert norm.z_loss_coef == 0.0
    assert ModelConfig(router="norm", z_loss_coef=1e-3).z_loss_coef == 1e-3  # explicit wins
    assert ModelConfig().replace(router="norm").z_loss_coef == 0.0  # a defaulted field follows the router
    assert ModelConfig(z_loss_coef=0.5).replace(router="norm").z_loss_coef == 0.5
    assert norm.replace(router="softmax").z_loss_coef == 1e-3
    assert ModelConfig.from_dict({"router": "norm"}).z_loss_coef == 0.0
    zero = ModelConfig.from_dict({"z_loss_coef": 0})  # TOML's integer 0
    assert zero.z_loss_coef == 0.0 and isinstance(zero.z_loss_coef, float)
    assert ModelConfig.from_dict(norm.to_dict()) == norm and hash(norm) == hash(ModelConfig.from_dict(norm.to_dict()))
    flat = TrialConfig.from_dict({"model.router": "norm"}).to_flat()
    assert flat["model.z_loss_coef"] == 0.0  # the logged param is the resolved value
    assert TrialConfig.from_dict({}).to_flat()["model.z_loss_coef"] == 1e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        norm.z_loss_coef = 1.0
    for bad in (-1.0, "big", True):
        with pytest.raises(ConfigError) as err:
            ModelConfig(z_loss_coef=bad)
        assert err.value.field == "model.z_loss_coef"
    assert float(_model(router="norm")(torch.randint(0, 64, (1, 8))).stats.z_loss) == 0.0


# ------------------------------------------------------------------ non-wrapping windows


def test_clamped_windows_do_not_wrap() -> None:
    ring = Topology(n_layers=6, pool_size=24, window=8, stride=4)
    clamped = Topology(n_layers=6, pool_size=24, window=8, stride=4, layout="clamped")
    assert ring.window_ids(5) == [20, 21, 22, 23, 0, 1, 2, 3]
    assert set(clamped.window_ids(5)) == set(range(16, 24))
    assert not set(clamped.window_ids(5)) & set(clamped.window_ids(0))
    assert clamped.window_ids(5)[:4] == [20, 21, 22, 23]  # the layer's own start first (narrow windows)
    assert [clamped.window_ids(l) for l in range(5)] == [list(range(4 * l, 4 * l + 8)) for l in range(5)]
    assert ring.exposure == (2,) * 24
    assert clamped.exposure == (1,) * 4 + (2,) * 12 + (3,) * 4 + (2,) * 4
    for topo in (ring, clamped):
        assert topo.virtual_width == 48 and topo.unreachable == 0
        assert topo.log10_paths(2) == pytest.approx(6 * math.log10(28))
    # a stride that runs past the pool: the ring wraps onto the first experts, clamped windows pile up
    r2 = Topology(n_layers=4, pool_size=8, window=4, stride=4)
    c2 = Topology(n_layers=4, pool_size=8, window=4, stride=4, layout="clamped")
    assert r2.exposure == (2,) * 8 and c2.exposure == (1,) * 4 + (3,) * 4
    # unreachable experts are counted in both layouts
    r3 = Topology(n_layers=2, pool_size=12, window=3, stride=2)
    c3 = Topology(n_layers=3, pool_size=12, window=3, stride=1, layout="clamped")
    assert (r3.unreachable, c3.unreachable) == (7, 7)


def test_clamped_layout_is_counted_and_validated() -> None:
    ring = BASE.replace(n_layers=6, pool_size=24, window=8, stride=4, n_heads=2)
    clamped = ring.replace(window_layout="clamped")
    c_ring, c_clamped = check_counts(MoUEModel(ring), ring), check_counts(MoUEModel(clamped), clamped)
    assert c_ring.n_params_total == c_clamped.n_params_total and c_ring.n_params_active == c_clamped.n_params_active
    assert (c_ring.virtual_width, c_ring.log10_paths) == (c_clamped.virtual_width, c_clamped.log10_paths)
    assert (c_ring.exposure_min, c_ring.exposure_max) == (2, 2)
    assert (c_clamped.exposure_min, c_clamped.exposure_max, c_clamped.unreachable) == (1, 3, 0)
    with pytest.warns(UserWarning, match="7 of 12 experts are in no layer's window"):
        sparse = BASE.replace(n_layers=2, pool_size=12, window=3, stride=2)
    assert count(sparse).unreachable == 7
    model = MoUEModel(clamped)
    ids = model.moe.router.window_ids_LW
    assert set(ids[5].tolist()) == set(range(16, 24))
    with pytest.raises(ConfigError) as err:
        ModelConfig(window_layout="spiral")
    assert str(err.value).startswith("model.window_layout ('spiral') must be one of ring, clamped")
    assert ModelConfig.from_dict(clamped.to_dict()) == clamped


# ------------------------------------------------------------------ conversion into any target


SRC = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, expert_hidden=16, top_k=2,
                  pool_size=12, window=4, stride=4)
TARGETS = {
    "switch": dict(),
    "pool": dict(balance="pool"),
    "pool-current": dict(balance="pool", balance_prev_batch=False),
    "exposure": dict(balance="exposure", balance_depth_weights=(1.0, 2.0, 3.0)),
    "expert-bias": dict(expert_bias=True),
    "shared-expert": dict(n_shared=1),
    "trajectory": dict(router="trajectory", router_state_dim=8),
    "moue-style": dict(router="trajectory", router_state_dim=8, balance="exposure", expert_bias=True, n_shared=1),
    "shared-router": dict(router_shared=True),
    "clamped": dict(window_layout="clamped"),
    "no-z-loss": dict(z_loss_coef=0.0, balance="none"),
}


def _source(opts: dict) -> tuple[ModelConfig, LayerwiseMoEModel]:
    shared = opts.get("router_shared", False)
    cfg = layerwise_config(SRC.replace(**{k: v for k, v in opts.items() if k != "router_shared"}), 4)
    cfg = cfg.replace(router_shared=shared)
    torch.manual_seed(11)
    return cfg, LayerwiseMoEModel(cfg)


@pytest.mark.parametrize("name", TARGETS)
def test_conversion_into_every_target_family_keeps_the_logits(name: str) -> None:
    src_cfg, src = _source(TARGETS[name])
    init = "copy" if src_cfg.router_shared else "zero"
    cfg, state = convert_layerwise(src.state_dict(), src_cfg, target_window=8, router_init=init)
    for key, value in TARGETS[name].items():
        assert getattr(cfg, key) == value, key
    model = MoUEModel(cfg)
    model.load_state_dict(state, strict=True)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(12))
    model.set_window(4)
    torch.testing.assert_close(model(idx).logits, src(idx), atol=1e-5, rtol=1e-5)
    model.set_window(8)
    out = model(idx)
    (out.logits.float().pow(2).mean() + out.aux_loss).backward()  # trains on from here
    assert model.moe.pool.w_in_PDF2.grad.abs().sum() > 0


def test_conversion_into_an_explicit_target_and_what_it_refuses() -> None:
    src_cfg, src = _source({})
    derived, _ = convert_layerwise(src.state_dict(), src_cfg, target_window=8)
    target = derived.replace(router="trajectory", router_state_dim=8, n_shared=1, balance="exposure")
    cfg, state = convert_layerwise(src.state_dict(), src_cfg, target_window=8, target=target)
    assert cfg == target
    model = MoUEModel(cfg)
    model.load_state_dict(state, strict=True)
    model.set_window(4)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx).logits, src(idx), atol=1e-5, rtol=1e-5)
    assert (state["moe.router.keys_PR"] == 0).all() and (state["blocks.0.shared.w_out.weight"] == 0).all()
    refused = [(derived.replace(router="norm"), "model.router"), (derived.replace(d_model=64), "model.d_model"),
               (derived.replace(router_renorm=False), "model.router_renorm"), (derived.replace(window=6), "model.window")]
    for bad, field in refused:
        with pytest.raises(ConfigError) as err:
            convert_layerwise(src.state_dict(), src_cfg, target_window=8, target=bad)
        assert err.value.field == field
    with pytest.raises(ConfigError, match="must be copy for a shared router"):
        convert_layerwise(src.state_dict(), src_cfg, target_window=8, target=derived.replace(router_shared=True))


BASES = {
    "softmax": dict(),
    "norm-pool": dict(router="norm", balance="pool"),
    "trajectory-exposure": dict(router="trajectory", router_state_dim=8, balance="exposure"),
    "bias-shared": dict(expert_bias=True, n_shared=1),
    "shared-router": dict(router_shared=True),
}


@pytest.mark.parametrize("name", BASES)
def test_widening_a_layerwise_moue_checkpoint_of_every_family_keeps_the_logits(name: str) -> None:
    base = layerwise_config(SRC, 4).replace(**BASES[name])
    torch.manual_seed(13)
    model = MoUEModel(base)
    if base.expert_bias:
        with torch.no_grad():
            model.moe.router.bias_LW.uniform_(-0.01, 0.01)
    idx = torch.randint(0, 64, (2, 16))
    before = model(idx).logits
    cfg, state = widen_layerwise(model.state_dict(), base, target_window=8,
                                 router_init="copy" if base.router_shared else "zero")
    wide = MoUEModel(cfg)
    wide.load_state_dict(state, strict=True)
    wide.set_window(4)
    torch.testing.assert_close(wide(idx).logits, before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["pool", "expert-bias", "shared-expert", "moue-style", "clamped"])
def test_moue_convert_and_init_from_work_for_every_target_family(name: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from moue.train import NullSink, train
    from moue.studies.cli import app

    src_cfg, src = _source(TARGETS[name])
    ckpt = tmp_path / "layerwise.pt"
    torch.save({"config": src_cfg.to_dict(), "model": src.state_dict()}, ckpt)
    out_path = tmp_path / "moue.pt"
    result = CliRunner().invoke(app, ["convert", str(ckpt), "-o", str(out_path), "--window", "8"])
    assert result.exit_code == 0, result.output
    blob = torch.load(out_path, weights_only=True)
    cfg = ModelConfig.from_dict(blob["config"])
    model = MoUEModel(cfg)
    model.load_state_dict(blob["model"], strict=True)
    model.set_window(blob["start_window"])
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx).logits, src(idx), atol=1e-5, rtol=1e-5)
    trial = TrialConfig.from_dict({"model": blob["config"],
                                   "train": {"tokens": 1024, "batch_tokens": 256, "seq_len": 16, "eval_every_tokens": 512,
                                             "eval_batch": 8, "device": "cpu", "init_from": str(out_path),
                                             "widen_tokens": 512},
                                   "data": {"val_tokens": 512}})
    sink = NullSink()
    assert train(trial, sink, cache_dir=tmp_path / "cache").status == "finished"
    first = sink.marks[0].metrics["val/loss"]
    assert first == pytest.approx(_val_loss(src, trial, tmp_path / "cache"), rel=1e-6)  # starts where the source is


def _val_loss(model, trial: TrialConfig, cache_dir) -> float:
    import torch.nn.functional as F

    from moue.data import load_corpus, validation_set

    val = validation_set(load_corpus(trial.data, cache_dir=cache_dir), seq_len=trial.train.seq_len,
                         n_tokens=trial.data.val_tokens)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in val.batches(trial.train.eval_batch):
            logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    return total / n


# ------------------------------------------------------------------ dead experts while a window widens


def test_dead_fraction_ignores_experts_a_widening_window_has_not_reached(tmp_path) -> None:
    from moue.train import NullSink, train

    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, expert_hidden=16, top_k=2,
                      pool_size=16, window=8, stride=8)
    torch.manual_seed(0)
    path = tmp_path / "narrow.pt"
    torch.save({"config": cfg.to_dict(), "model": MoUEModel(cfg).state_dict(), "start_window": 2}, path)
    assert cfg.topology.exposure_at(2) == (1, 1) + (0,) * 6 + (1, 1) + (0,) * 6
    trial = TrialConfig.from_dict({"model": cfg.to_dict(),
                                   "train": {"tokens": 1024, "batch_tokens": 256, "seq_len": 16, "eval_every_tokens": 256,
                                             "eval_batch": 8, "device": "cpu", "init_from": str(path),
                                             "widen_tokens": 1024},
                                   "data": {"val_tokens": 512}})
    sink = NullSink()
    assert train(trial, sink, cache_dir=tmp_path / "cache").status == "finished"
    # step 1 ran at window 2: top-2 of 2 uses all 4 visible experts; the 12 others are not yet visible
    assert sink.marks[1].metrics["balance/dead_frac"] == 0.0


# ------------------------------------------------------------------ the training loss


def test_train_backpropagates_the_auxiliary_loss(tmp_path) -> None:
    """Two trials that differ only in the balance coefficient (no z-loss) end with different routers:
    ``train()`` adds the auxiliary loss to what it differentiates."""
    from moue.train import NullSink, train

    routers = []
    for coef in (0.0, 10.0):
        cfg = TrialConfig.from_dict({
            "model": dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, expert_hidden=16,
                          pool_size=8, window=4, stride=4, balance="switch", balance_coef=coef, z_loss_coef=0.0),
            "train": dict(tokens=512, batch_tokens=256, seq_len=16, eval_every_tokens=512, eval_batch=8,
                          device="cpu", warmup_frac=0.0),
            "data": dict(val_tokens=512)})
        sink = NullSink()
        assert train(cfg, sink, cache_dir=tmp_path / "cache").status == "finished"
        routers.append(sink.checkpoints[-1][1]["model"]["moe.router.weight_LWD"])
    assert not torch.allclose(routers[0], routers[1], rtol=0, atol=1e-6)
