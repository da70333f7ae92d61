"""The shared expert pool and its dropless dispatch (docs/MODEL.md sections 4-5).

Legend: ``T`` tokens, ``D`` model width, ``F`` expert hidden size, ``P`` pool size, ``K`` top-k,
``S = T*K`` routed (token, slot) pairs, ``L`` layers, ``w`` active window width.

Expert weights live once as pool tensors ``w_in_PDF2`` (gate and up projections side by side) and
``w_out_PFD``, referenced by every layer, so gradients from all layers accumulate in the same rows.

Dispatch of one layer, with no per-expert Python slicing of autograd tensors:

1. one stable argsort of the ``S`` pool ids -> ``order_S``; ``token_S = order_S // K``;
2. counts per expert (``bincount``) -> cumulative ``offs_P`` (int32);
3. one gather of token rows ``x_SD = x_TD[token_S]``;
4. grouped matmul ``x_SD @ w_in[p]`` per expert group -> SwiGLU -> grouped matmul with ``w_out``,
   times the gate (``moue.grouped.gated_experts``: ``torch.nn.functional.grouped_mm`` in one
   autograd function with its own backward; empty groups cost nothing and get zero gradient, so
   experts outside every window are never touched);
5. gather-and-sum back to token order with one ``index_add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moue.balance import POOLED, balance_loss, pooled_statistic, z_loss
from moue.config import ModelConfig
from moue.grouped import gated_experts, grouped_mm
from moue.router import Route, Router

__all__ = ["ExpertPool", "MoE", "RouterStats", "SwiGLU", "dispatch", "grouped_mm", "select_backend"]

class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: ``W2 (silu(W1 x) * W3 x)``; gate and up fused in one matrix."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).split(self.hidden, dim=-1)
        return self.w_out(F.silu(gate) * up)


class ExpertPool(nn.Module):
    """``P`` SwiGLU experts stored as ``[P, D, 2F]`` and ``[P, F, D]``."""

    def __init__(self, pool_size: int, d_model: int, hidden: int, init_std: float) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_in_PDF2 = nn.Parameter(torch.empty(pool_size, d_model, 2 * hidden))
        self.w_out_PFD = nn.Parameter(torch.empty(pool_size, hidden, d_model))
        nn.init.normal_(self.w_in_PDF2, std=init_std)
        nn.init.normal_(self.w_out_PFD, std=init_std)


def dispatch(
    x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor, pool: ExpertPool, *, backend: str = "grouped_mm",
    keep_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k mixture: ``y_t = sum_k gate_tk * expert_(id_tk)(x_t)`` over the pairs of ``keep_TK``
    (all of them when ``None``: dropless; a dropped pair costs nothing and adds nothing).

    ``backend``: ``grouped_mm`` (torch grouped matmuls; CPU and GPU) or ``triton`` (the fused
    kernels of ``moue.triton_moe``; CUDA, or CPU under ``TRITON_INTERPRET=1``).
    """
    T, K = ids_TK.shape
    P = pool.w_in_PDF2.shape[0]
    ids_S = ids_TK.reshape(-1)
    gates_S = gates_TK.reshape(-1)
    if keep_TK is None:
        order_S = ids_S.argsort(stable=True)
        token_S = order_S // K
    else:  # only the kept pairs, in the same expert-major order
        pair_S = keep_TK.reshape(-1).nonzero().squeeze(1)
        ids_S, gates_S = ids_S.index_select(0, pair_S), gates_S.index_select(0, pair_S)
        order_S = ids_S.argsort(stable=True)
        token_S = (pair_S // K).index_select(0, order_S)
    offs_P = ids_S.bincount(minlength=P).cumsum(0).to(torch.int32)
    gates_S = gates_S.index_select(0, order_S)
    w_in, w_out, x_in = pool.w_in_PDF2, pool.w_out_PFD, x_TD
    if torch.is_autocast_enabled(x_TD.device.type):
        # autocast does not reach custom autograd functions or Triton: the expert matmuls run in
        # the autocast dtype (bf16 on GPU) like any autocast linear, accumulating in fp32; the
        # casts are differentiable, so the fp32 parameters get fp32 gradients
        low = torch.get_autocast_dtype(x_TD.device.type)
        x_in, gates_S, w_in, w_out = (t.to(low) for t in (x_TD, gates_S, w_in, w_out))
    if backend == "triton":
        from moue.triton_moe import triton_experts

        y_SD = triton_experts(x_in, token_S, gates_S, w_in, w_out, offs_P)
    else:
        y_SD = gated_experts(x_in.index_select(0, token_S), gates_S, w_in, w_out, offs_P)
    # the k contributions of a token are summed in the residual stream's dtype (fp32 under autocast)
    return x_TD.new_zeros(T, x_TD.shape[1]).index_add(0, token_S, y_SD.to(x_TD.dtype))


def select_backend(choice: str, device: torch.device) -> str:
    """``auto``: Triton on CUDA, grouped matmuls elsewhere; ``triton`` / ``grouped_mm`` force one."""
    if choice == "grouped_mm":
        return "grouped_mm"
    if choice == "triton":
        from moue.triton_moe import triton_available

        if not triton_available(device):
            raise RuntimeError(f"model.dispatch = 'triton' needs a CUDA device or TRITON_INTERPRET=1 "
                               f"(this tensor is on {device})")
        return "triton"
    return "triton" if device.type == "cuda" else "grouped_mm"


@dataclass
class RouterStats:
    """Per-layer routing statistics of one forward pass (detached), for logging and balancing."""

    load_LP: torch.Tensor  # tokens routed to each pool expert, per layer
    load_Lw: torch.Tensor  # the same per window slot (what expert-bias balancing uses)
    entropy_L: torch.Tensor  # mean router entropy (nats) over tokens
    lse_L: torch.Tensor  # mean logsumexp of the router logits
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_frac: float = 0.0  # chosen (token, expert) pairs dropped for capacity


class MoE(nn.Module):
    """Router + shared pool + balance losses for all layers of one model.

    ``forward(layer, x_TD, state)`` computes one layer's routed FFN; ``finish(routes)`` turns the
    layers' routes into the auxiliary loss and ``RouterStats``. ``window`` is the active window width
    (smaller than ``cfg.window`` while a converted model's window widens; see ``convert``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pool = ExpertPool(cfg.pool_size, cfg.d_model, cfg.expert_hidden, cfg.init_std)
        self.router = Router(cfg)
        self.window = cfg.window
        if cfg.balance in POOLED and cfg.balance_prev_batch:
            # the pool-level load statistic of the previous training micro-batch (fbar for pool, r for
            # exposure; moue.balance), balancing state written in training mode only
            self.register_buffer("prev_fbar_P", torch.zeros(cfg.pool_size))
            self.register_buffer("has_prev_fbar", torch.zeros((), dtype=torch.bool))

    def set_window(self, window: int) -> None:
        if not self.cfg.top_k <= window <= self.cfg.window:
            raise ValueError(f"window ({window}) must be in [top_k ({self.cfg.top_k}), {self.cfg.window}]")
        self.window = window

    def forward(
        self, layer: int, x_TD: torch.Tensor, state_TR: torch.Tensor | None
    ) -> tuple[torch.Tensor, Route, torch.Tensor | None]:
        route, state_TR = self.router(layer, x_TD, state_TR, self.window)
        backend = select_backend(self.cfg.dispatch, x_TD.device)
        y_TD = dispatch(x_TD, route.ids_TK, route.gates_TK, self.pool, backend=backend, keep_TK=route.keep_TK)
        return y_TD, route, state_TR

    def finish(self, routes: list[Route]) -> tuple[torch.Tensor, RouterStats]:
        cfg, P, w = self.cfg, self.cfg.pool_size, self.window
        load_Lw = torch.stack([r.chosen_slots().bincount(minlength=w) for r in routes]).float()
        frac_Lw = load_Lw / load_Lw.sum(dim=1, keepdim=True).clamp_min(1)
        prob_Lw = torch.stack([r.balance_Tw.mean(dim=0) for r in routes])
        ids_Lw = torch.stack([r.window_ids_w for r in routes])
        lse_LT = [torch.logsumexp(r.logits_Tw.float(), dim=-1) for r in routes]

        use_prev = cfg.balance in POOLED and cfg.balance_prev_batch
        gamma_L = prob_Lw.new_tensor(cfg.balance_depth_weights) if cfg.balance_depth_weights else None
        if use_prev and not self.has_prev_fbar:  # UniPool: no pool-level loss before a previous batch
            bal = prob_Lw.new_zeros(())
        else:
            # a copy: the loss keeps it for backward while the buffer is updated below
            prev = self.prev_fbar_P.clone() if use_prev else None
            bal = balance_loss(cfg.balance, cfg.balance_coef, frac_Lw=frac_Lw, prob_Lw=prob_Lw,
                               ids_Lw=ids_Lw, pool_size=P, prev_P=prev, gamma_L=gamma_L)
        if use_prev and self.training:  # after the loss read it: this batch's statistic is the next one's
            self.prev_fbar_P.copy_(pooled_statistic(cfg.balance, frac_Lw, ids_Lw, P, gamma_L))
            self.has_prev_fbar.fill_(True)
        zl = z_loss(cfg.z_loss_coef, lse_LT) if cfg.z_loss_coef else bal.new_zeros(())
        with torch.no_grad():
            load_LP = load_Lw.new_zeros(len(routes), P).scatter_add_(1, ids_Lw, load_Lw)
            entropy_L = torch.stack(
                [-(r.probs_Tw * r.probs_Tw.clamp_min(1e-30).log()).sum(-1).mean() for r in routes]
            )
            stats = RouterStats(
                load_LP=load_LP, load_Lw=load_Lw, entropy_L=entropy_L,
                lse_L=torch.stack([lse.mean() for lse in lse_LT]).detach(),
                balance_loss=bal.detach(), z_loss=zl.detach(),
                dropped_frac=sum(r.n_dropped() for r in routes) / max(1.0, float(load_Lw.sum())),
            )
        return bal + zl, stats
