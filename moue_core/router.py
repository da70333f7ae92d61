"""Routers of the moue family (docs/MODEL.md section 2): one module routes every layer.

Tensor names carry their shapes (torchtitan style). Legend:

    T tokens   D model width   L layers   P pool size   W window (max)   w window (now)
    K top-k    R trajectory state size

Every router scores only the ``w`` experts of layer ``l``'s window ``C_l`` (so experts outside the
window never influence selection), picks the top-k, and returns pool ids and gates:

- ``softmax``: logits ``z = W_l x``; probabilities ``softmax(z)``; gates are the selected
  probabilities, renormalised over the k (Mixtral) when ``router_renorm`` else raw (Switch).
- ``norm``: UniPool's NormRouter, ``s = sigma * c * relu(z / (||z|| + eps))``; the selected scores
  are the gates (not renormalised). ``c`` is a Monte Carlo constant (``norm_constant``).
- ``trajectory``: the MoUE-style universal router. A per-token state carried down the depth,
  ``r_l = GRUCell(A_l x_l, r_(l-1))``, ``r_0 = 0``, one GRU for all layers, per-layer ``A_l``;
  logits ``z_l = W_l x_l + U[C_l] r_l`` with universal expert keys ``U: [P, R]``. Gates as softmax.
- ``sigmoid``: DeepSeek-V3's scores ``s = sigmoid(z)``; gates are the selected scores normalised
  over the k (``router_renorm``), the balance losses use ``s`` normalised per token (V3's ``s'``).
- ``router_shared``: one pool-wide matrix ``[P, D]`` for all layers (Omni-Router); otherwise
  per-layer matrices ``[L, W, D]`` indexed by window slot (row ``j`` scores the expert of slot ``j``,
  ``Topology.window_ids``: ``(o_l + j) mod P`` on the ring).

Every router reports ``probs = softmax(z)`` over the window (router entropy, statistics) and the
per-token scores the balance losses pair with the load (``balance_Tw``, the "router probability"
``p`` of docs/MODEL.md section 3): ``softmax(z)`` for ``softmax`` and ``trajectory``; for ``norm``
the NormRouter scores themselves, as UniPool feeds its pool loss ``scores_for_aux_loss = scores``
(Centaurus-Alpha/UniPool, ``megatron/core/transformer/moe/router.py``, ``NormRouter.routing``).
NormRouter's selection ignores the scale of ``z``, and so does a loss on its scores (up to the
``eps`` of the norm); ``softmax(z)`` instead falls with ``|z|`` and could be lowered by shrinking the
logits without rebalancing anything. A loss on the scores is linear in ``sigma``, so the learnable
scale gets a balance gradient ``d loss / d sigma = loss / sigma`` (it pulls ``sigma`` down; the
language-model loss holds it up).

Precision: logits, probabilities, scores and top-k run in fp32 (fp64 for a float64 model), with
autocast switched off for the router (a bf16 near-tie would change the selection); the gates go to
the experts in the input's dtype.

Initialisation: every router matrix, the trajectory router's projections, keys and GRU weights are
``N(0, init_std^2)``; the GRU biases start at zero (not PyTorch's ``U(-1/sqrt(R), 1/sqrt(R))``).

Expert-bias balancing (aux-loss-free, DeepSeek-V3): a buffer added to the selection scores only
(the gates are the unbiased scores); ``update_bias`` moves it after each optimizer step, outside the
forward pass. ``expert_bias_scope = "layer"``: ``bias_LW``, one per layer and window slot, each
layer balanced on its own; ``"pool"``: ``bias_P``, one per pool expert and read by every layer that
reaches it, moved by the expert's load per reaching layer against the mean over reachable experts
(a shared pool balanced as a whole, the aux-loss-free analogue of UniPool's pool loss).

Who chooses (``model.routing``, ``moue.config``): ``token`` picks each token's top k as above.
``expert`` and ``unified`` score every (token, slot) pair of the window and choose pairs instead
(expert choice: each slot its ``C`` best tokens; unified, USMoE: the ``T * k`` best pairs by a mix
of the token-wise and token-axis softmax); their routes list all ``w`` slots per token with a
``chosen_TK`` mask, and the gates are the router's scores of the chosen pairs (not renormalised: a
token may get 0 to ``w`` experts).

Capacity (``capacity_factor > 0``, token choice): ``keep_TK`` marks the chosen pairs within their
expert's capacity ``ceil(c * T * k / w)``; top-1 choices claim room first, then token order
(GShard); the rest are dropped (``moue.moe`` skips them; the loads count them, so the balance
losses still see what the router wanted).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from moue.config import ModelConfig

__all__ = ["Router", "Route", "RouterKind", "KINDS", "norm_constant"]


def norm_constant(window: int, top_k: int, *, samples: int = 200_000, seed: int = 0) -> float:
    """Monte Carlo ``c = E[1 / sqrt(sum of the k largest y_j^2)]``, ``y = relu(x / ||x||)``.

    ``x ~ N(0, I_w)``; samples where every ``y_j`` is zero (all ``x_j <= 0``) are dropped, since
    such a token gets no positive score at all. With this ``c`` the selected NormRouter scores are
    about 1 at initialisation (UniPool).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, window, generator=g, dtype=torch.float64)
    y = torch.relu(x / x.norm(dim=1, keepdim=True))
    top = y.topk(top_k, dim=1).values.pow(2).sum(dim=1)
    top = top[top > 0]
    return float((1.0 / top.sqrt()).mean())


@functools.lru_cache(maxsize=None)
def _norm_constant_for(window: int, top_k: int) -> float:
    return norm_constant(window, top_k)


@dataclass
class Route:
    """One layer's routing decision for ``T`` tokens."""

    ids_TK: torch.Tensor  # pool ids of the selected experts (int64)
    slots_TK: torch.Tensor  # the same experts as window slots 0..w-1
    gates_TK: torch.Tensor  # gate weights (differentiable)
    probs_Tw: torch.Tensor  # softmax(z) over the window (differentiable): entropy, statistics
    balance_Tw: torch.Tensor  # the scores the balance losses use (differentiable; module docstring)
    logits_Tw: torch.Tensor  # router logits over the window, fp32 (z-loss, statistics)
    window_ids_w: torch.Tensor  # pool ids of the window, in slot order
    chosen_TK: torch.Tensor | None = None  # pairs the router chose (None: all; expert / unified routing)
    keep_TK: torch.Tensor | None = None  # chosen pairs that are computed (None: all chosen; capacity)

    def chosen_slots(self) -> torch.Tensor:
        """The window slots of the chosen pairs, flattened (what the loads count)."""
        return self.slots_TK.reshape(-1) if self.chosen_TK is None else self.slots_TK[self.chosen_TK]

    def n_dropped(self) -> int:
        """Chosen pairs dropped for capacity."""
        if self.keep_TK is None or self.keep_TK is self.chosen_TK:
            return 0
        chosen = self.keep_TK.numel() if self.chosen_TK is None else int(self.chosen_TK.sum())
        return chosen - int(self.keep_TK.sum())


class RouterKind:
    """What one ``model.router`` kind adds to the common window scoring (the registry ``KINDS``).

    Every kind starts from ``z = W_l x`` over the window; a kind may own parameters (``build``),
    carry a per-token state down the depth (``initial_state``, ``logits``), and turn the window's
    ``softmax(z)`` into its own selection scores (``scores``) and the scores its balance losses
    pair with the load (``balance``; ``softmax(z)`` by default). ``renorm``: whether
    ``router_renorm`` applies to its gates."""

    renorm = True

    def build(self, router: Router, cfg: ModelConfig) -> None:
        pass

    def reset(self, router: Router, std: float) -> None:
        """Initialise what ``build`` added (after the common router matrices)."""

    def initial_state(self, router: Router, x_TD: torch.Tensor) -> torch.Tensor | None:
        return None

    def logits(self, router: Router, layer: int, x_TD: torch.Tensor, logits_Tw: torch.Tensor,
               state_TR: torch.Tensor | None, window_ids_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return logits_Tw, state_TR

    def scores(self, router: Router, logits_Tw: torch.Tensor, probs_Tw: torch.Tensor) -> torch.Tensor:
        return probs_Tw

    def balance(self, probs_Tw: torch.Tensor, scores_Tw: torch.Tensor) -> torch.Tensor:
        return probs_Tw


class _Softmax(RouterKind):
    """Gates are the selected ``softmax(z)`` probabilities."""


class _Sigmoid(RouterKind):
    """DeepSeek-V3: ``sigmoid(z)`` scores; balance on the scores normalised per token."""

    def scores(self, router: Router, logits_Tw: torch.Tensor, probs_Tw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits_Tw)

    def balance(self, probs_Tw: torch.Tensor, scores_Tw: torch.Tensor) -> torch.Tensor:
        return scores_Tw / scores_Tw.sum(dim=-1, keepdim=True)


class _Norm(RouterKind):
    """UniPool's NormRouter: ``sigma * c * relu(z / (||z|| + eps))``, gates not renormalised; the
    balance losses use these scores (as UniPool's pool loss does). ``c`` is the constant of the
    active window (``norm_c`` for the full one), so a window that widens keeps its scores near 1."""

    renorm = False

    def build(self, router: Router, cfg: ModelConfig) -> None:
        router.sigma = nn.Parameter(torch.ones(()))
        router.register_buffer("norm_c", torch.tensor(_norm_constant_for(cfg.window, cfg.top_k)), persistent=False)

    def scores(self, router: Router, logits_Tw: torch.Tensor, probs_Tw: torch.Tensor) -> torch.Tensor:
        w, cfg = logits_Tw.shape[1], router.cfg
        c = router.norm_c if w == cfg.window else _norm_constant_for(w, cfg.top_k)
        unit_Tw = logits_Tw / (logits_Tw.norm(dim=-1, keepdim=True) + 1e-6)
        return router.sigma * c * torch.relu(unit_Tw)

    def balance(self, probs_Tw: torch.Tensor, scores_Tw: torch.Tensor) -> torch.Tensor:
        return scores_Tw


class _Trajectory(RouterKind):
    """The MoUE-style universal router: a GRU state over depth and universal expert keys."""

    def build(self, router: Router, cfg: ModelConfig) -> None:
        L, P, D, R = cfg.n_moe_layers, cfg.pool_size, cfg.d_model, cfg.router_state_dim
        router.proj_LRD = nn.Parameter(torch.empty(L, R, D))
        router.gru = nn.GRUCell(R, R)
        router.keys_PR = nn.Parameter(torch.empty(P, R))

    def reset(self, router: Router, std: float) -> None:
        for p in (router.proj_LRD, router.keys_PR, router.gru.weight_ih, router.gru.weight_hh):
            nn.init.normal_(p, std=std)
        nn.init.zeros_(router.gru.bias_ih)
        nn.init.zeros_(router.gru.bias_hh)

    def initial_state(self, router: Router, x_TD: torch.Tensor) -> torch.Tensor | None:
        return x_TD.new_zeros(x_TD.shape[0], router.cfg.router_state_dim)

    def logits(self, router, layer, x_TD, logits_Tw, state_TR, window_ids_w):
        state_TR = router.gru(x_TD @ router.proj_LRD[layer].t(), state_TR)
        return logits_Tw + state_TR @ router.keys_PR[window_ids_w].t(), state_TR


KINDS: dict[str, RouterKind] = {"softmax": _Softmax(), "norm": _Norm(), "trajectory": _Trajectory(),
                                "sigmoid": _Sigmoid()}


def capacity(tokens: int, top_k: int, window: int, factor: float) -> int:
    """Slots one expert of a layer may take: ``ceil(factor * T * k / w)``, at most ``T``."""
    return min(tokens, math.ceil(factor * tokens * top_k / window))


def within_capacity(slots_TK: torch.Tensor, window: int, cap: int) -> torch.Tensor:
    """``[T, K]`` mask of the pairs within their slot's capacity ``cap``: top-1 choices first, then
    the second choices, each in token order (GShard's priority)."""
    T, K = slots_TK.shape
    flat_S = slots_TK.t().reshape(-1)  # k-major
    order_S = flat_S.argsort(stable=True)
    counts_w = flat_S.bincount(minlength=window)
    starts_w = counts_w.cumsum(0) - counts_w
    rank_S = torch.empty_like(flat_S)
    rank_S[order_S] = torch.arange(flat_S.numel(), device=flat_S.device) - starts_w[flat_S[order_S]]
    return (rank_S < cap).view(K, T).t()


def choose_pairs(scores_Tw: torch.Tensor, logits_Tw: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """``[T, w]`` mask of the (token, slot) pairs expert or unified routing chooses (no gradient)."""
    T, w = scores_Tw.shape
    with torch.no_grad():
        if cfg.routing == "expert":  # each slot its C best tokens (Zhou et al. 2022)
            cap = capacity(T, cfg.top_k, w, cfg.capacity_factor or 1.0)
            rows_Cw = scores_Tw.topk(cap, dim=0, sorted=False).indices
            return torch.zeros_like(scores_Tw, dtype=torch.bool).scatter_(0, rows_Cw, True)
        # unified (USMoE): the T*k best pairs by alpha * token-choice + (1 - alpha) * expert-choice score;
        # the token-axis softmax is scaled by T / w so both terms have the same column mass
        a = cfg.routing_alpha
        unified_Tw = a * scores_Tw + (1 - a) * (T / w) * logits_Tw.softmax(dim=0)
        best = unified_Tw.reshape(-1).topk(min(T * cfg.top_k, T * w), sorted=False).indices
        return torch.zeros(T * w, dtype=torch.bool, device=scores_Tw.device).scatter_(0, best, True).view(T, w)


class Router(nn.Module):
    """Routes every layer of a model; ``forward(layer, x_TD, state_TR, window)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = KINDS[cfg.router]
        L, P, W, D = cfg.n_moe_layers, cfg.pool_size, cfg.window, cfg.d_model
        topo = cfg.topology
        # window_ids_LW[l, j]: the expert of slot j (Topology.window_ids); a window w < W is its first w columns
        self.register_buffer(
            "window_ids_LW",
            torch.tensor([topo.window_ids(layer) for layer in range(L)], dtype=torch.long),
            persistent=False,
        )
        if cfg.router_shared:
            self.weight_PD = nn.Parameter(torch.empty(P, D))
        else:
            self.weight_LWD = nn.Parameter(torch.empty(L, W, D))
        self.kind.build(self, cfg)
        if cfg.expert_bias and cfg.expert_bias_scope == "pool":
            self.register_buffer("bias_P", torch.zeros(P))
        elif cfg.expert_bias:
            self.register_buffer("bias_LW", torch.zeros(L, W))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.weight_PD if self.cfg.router_shared else self.weight_LWD, std=std)
        self.kind.reset(self, std)

    def initial_state(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        return self.kind.initial_state(self, x_TD)

    def forward(
        self, layer: int, x_TD: torch.Tensor, state_TR: torch.Tensor | None, window: int
    ) -> tuple[Route, torch.Tensor | None]:
        cfg = self.cfg
        window_ids_w = self.window_ids_LW[layer, :window]
        if cfg.router_shared:
            weight_wD = self.weight_PD[window_ids_w]
        else:
            weight_wD = self.weight_LWD[layer, :window]
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        with torch.autocast(x_TD.device.type, enabled=False):  # routing in fp32 (module docstring)
            x32_TD = x_TD.to(dtype)
            state_TR = None if state_TR is None else state_TR.to(dtype)
            logits_Tw, state_TR = self.kind.logits(self, layer, x32_TD, x32_TD @ weight_wD.to(dtype).t(), state_TR,
                                                   window_ids_w)
            probs_Tw = logits_Tw.softmax(dim=-1)
            scores_Tw = self.kind.scores(self, logits_Tw, probs_Tw)
            route = self._choose(logits_Tw, probs_Tw, scores_Tw, window_ids_w, layer)
        route.gates_TK = route.gates_TK.to(x_TD.dtype)
        return route, state_TR

    def _choose(self, logits_Tw, probs_Tw, scores_Tw, window_ids_w, layer: int) -> Route:
        """The route of one layer from its fp32 scores (module docstring: who chooses, capacity)."""
        cfg = self.cfg
        T, w = scores_Tw.shape
        common = dict(probs_Tw=probs_Tw, balance_Tw=self.kind.balance(probs_Tw, scores_Tw), logits_Tw=logits_Tw,
                      window_ids_w=window_ids_w)
        if cfg.routing != "token":
            slots_TK = torch.arange(w, device=scores_Tw.device).expand(T, w)
            chosen_TK = choose_pairs(scores_Tw.detach(), logits_Tw.detach(), cfg)
            return Route(ids_TK=window_ids_w[slots_TK], slots_TK=slots_TK, gates_TK=scores_Tw * chosen_TK,
                         chosen_TK=chosen_TK, keep_TK=chosen_TK, **common)
        select_Tw = scores_Tw.detach()
        if cfg.expert_bias:
            bias_w = self.bias_P[window_ids_w] if cfg.expert_bias_scope == "pool" else self.bias_LW[layer, :w]
            select_Tw = select_Tw + bias_w
        slots_TK = select_Tw.topk(cfg.top_k, dim=-1, sorted=False).indices
        gates_TK = scores_Tw.gather(1, slots_TK)
        if self.kind.renorm and cfg.router_renorm:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        keep_TK = None
        if cfg.capacity_factor:
            keep_TK = within_capacity(slots_TK, w, capacity(T, cfg.top_k, w, cfg.capacity_factor))
        return Route(ids_TK=window_ids_w[slots_TK], slots_TK=slots_TK, gates_TK=gates_TK, keep_TK=keep_TK, **common)

    @torch.no_grad()
    def update_bias(self, load_Lw: torch.Tensor) -> None:
        """``b_i += u * sign(mean load - load_i)`` per layer, over the active window slots.

        ``load_Lw`` holds the tokens routed to each window slot since the last update. Call after
        the optimizer step (it is balancing state, never touched by the forward pass).
        """
        if not self.cfg.expert_bias:
            return
        w = load_Lw.shape[1]
        if self.cfg.expert_bias_scope == "pool":  # per pool expert: its load per reaching layer
            ids = self.window_ids_LW[:, :w].reshape(-1)
            load_P = self.bias_P.new_zeros(self.bias_P.shape).index_add_(0, ids, load_Lw.reshape(-1).to(self.bias_P.dtype))
            reach_P = self.bias_P.new_zeros(self.bias_P.shape).index_add_(0, ids, torch.ones_like(ids, dtype=self.bias_P.dtype))
            seen = reach_P > 0
            per_reach_P = torch.where(seen, load_P / reach_P.clamp_min(1), 0.0)
            delta = torch.where(seen, torch.sign(per_reach_P[seen].mean() - per_reach_P), 0.0)
            self.bias_P += self.cfg.expert_bias_rate * delta
            return
        load_Lw = load_Lw.to(self.bias_LW.dtype)
        delta = torch.sign(load_Lw.mean(dim=1, keepdim=True) - load_Lw)
        self.bias_LW[:, :w] += self.cfg.expert_bias_rate * delta
