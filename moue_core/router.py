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

Expert-bias balancing (aux-loss-free, DeepSeek-V3): a buffer ``bias_LW`` added to the selection
scores only; ``update_bias`` moves it after each optimizer step, outside the forward pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from moue_core.config import ModelConfig

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


class RouterKind:
    """What one ``model.router`` kind adds to the common window scoring (the registry ``KINDS``).

    Every kind starts from ``z = W_l x`` over the window; a kind may own parameters (``build``),
    carry a per-token state down the depth (``initial_state``, ``logits``), and turn the window's
    ``softmax(z)`` into its own selection scores (``scores``). ``renorm``: whether
    ``router_renorm`` applies to its gates; ``balance_on_scores``: whether the balance losses use
    its scores (else ``softmax(z)``)."""

    renorm = True
    balance_on_scores = False

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


class _Softmax(RouterKind):
    """Gates are the selected ``softmax(z)`` probabilities."""


class _Norm(RouterKind):
    """UniPool's NormRouter: ``sigma * c * relu(z / (||z|| + eps))``, gates not renormalised; the
    balance losses use these scores (as UniPool's pool loss does). ``c`` is the constant of the
    active window (``norm_c`` for the full one), so a window that widens keeps its scores near 1."""

    renorm = False
    balance_on_scores = True

    def build(self, router: Router, cfg: ModelConfig) -> None:
        router.sigma = nn.Parameter(torch.ones(()))
        router.register_buffer("norm_c", torch.tensor(_norm_constant_for(cfg.window, cfg.top_k)), persistent=False)

    def scores(self, router: Router, logits_Tw: torch.Tensor, probs_Tw: torch.Tensor) -> torch.Tensor:
        w, cfg = logits_Tw.shape[1], router.cfg
        c = router.norm_c if w == cfg.window else _norm_constant_for(w, cfg.top_k)
        unit_Tw = logits_Tw / (logits_Tw.norm(dim=-1, keepdim=True) + 1e-6)
        return router.sigma * c * torch.relu(unit_Tw)


class _Trajectory(RouterKind):
    """The MoUE-style universal router: a GRU state over depth and universal expert keys."""

    def build(self, router: Router, cfg: ModelConfig) -> None:
        L, P, D, R = cfg.n_layers, cfg.pool_size, cfg.d_model, cfg.router_state_dim
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


KINDS: dict[str, RouterKind] = {"softmax": _Softmax(), "norm": _Norm(), "trajectory": _Trajectory()}


class Router(nn.Module):
    """Routes every layer of a model; ``forward(layer, x_TD, state_TR, window)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = KINDS[cfg.router]
        L, P, W, D = cfg.n_layers, cfg.pool_size, cfg.window, cfg.d_model
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
        if cfg.expert_bias:
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
            select_Tw = scores_Tw.detach()
            if cfg.expert_bias:
                select_Tw = select_Tw + self.bias_LW[layer, :window]
            slots_TK = select_Tw.topk(cfg.top_k, dim=-1, sorted=False).indices
            gates_TK = scores_Tw.gather(1, slots_TK)
            if self.kind.renorm and cfg.router_renorm:
                gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        route = Route(
            ids_TK=window_ids_w[slots_TK],
            slots_TK=slots_TK,
            gates_TK=gates_TK.to(x_TD.dtype),
            probs_Tw=probs_Tw,
            balance_Tw=scores_Tw if self.kind.balance_on_scores else probs_Tw,
            logits_Tw=logits_Tw,
            window_ids_w=window_ids_w,
        )
        return route, state_TR

    @torch.no_grad()
    def update_bias(self, load_Lw: torch.Tensor) -> None:
        """``b_i += u * sign(mean load - load_i)`` per layer, over the active window slots.

        ``load_Lw`` holds the tokens routed to each window slot since the last update. Call after
        the optimizer step (it is balancing state, never touched by the forward pass).
        """
        if not self.cfg.expert_bias:
            return
        w = load_Lw.shape[1]
        load_Lw = load_Lw.to(self.bias_LW.dtype)
        delta = torch.sign(load_Lw.mean(dim=1, keepdim=True) - load_Lw)
        self.bias_LW[:, :w] += self.cfg.expert_bias_rate * delta
