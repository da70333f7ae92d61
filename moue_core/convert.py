"""Progressive conversion of a layerwise MoE checkpoint (docs/MODEL.md section 7).

A layerwise MoE has ``E`` private experts per layer and a per-layer router ``[E, D]``. Placing the
``L*E`` trained experts on the ring in layer order (``P = L*E``, ``s = E``) with the window at its
original width ``w = E`` gives a MoUE-style model that computes exactly what the original computed.
Training then widens the window from ``E`` to a target ``w`` over a schedule (``WindowSchedule``);
router rows for newly visible experts start at zero, or copied from the router of the layer that
owned the expert (``router_init="copy"``).

``LayerwiseMoEModel`` is the source format: an ordinary per-layer MoE written independently of
``moue_core.moe`` (per-layer expert tensors, a naive per-expert loop), used both as the conversion
source and as the reference implementation the tests compare the shared-pool model against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moue_core.config import ModelConfig
from moue_core.errors import ConfigError
from moue_core.model import Attention, rope_tables

__all__ = ["LayerwiseMoEModel", "WindowSchedule", "convert_layerwise", "layerwise_config", "widen_layerwise"]


def layerwise_config(base: ModelConfig, experts_per_layer: int) -> ModelConfig:
    """``base`` with the layerwise topology ``P = L*E, w = E, s = E``."""
    P = base.n_layers * experts_per_layer
    return base.replace(ffn="moe", pool_size=P, window=experts_per_layer,
                        stride=experts_per_layer % P, group=1, router_shared=False)


class _LayerMoE(nn.Module):
    """One layer's private MoE: softmax router, top-k, SwiGLU experts, per-expert loop."""

    def __init__(self, d_model: int, n_experts: int, hidden: int, top_k: int, renorm: bool) -> None:
        super().__init__()
        self.top_k, self.renorm, self.hidden = top_k, renorm, hidden
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs = self.router(x_TD).float().softmax(dim=-1)
        top = probs.topk(self.top_k, dim=-1)
        gates = top.values / top.values.sum(-1, keepdim=True) if self.renorm else top.values
        y = torch.zeros_like(x_TD)
        for e in range(self.w_in.shape[0]):
            tok, slot = (top.indices == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            gate, up = (x_TD[tok] @ self.w_in[e]).split(self.hidden, dim=-1)
            out = (F.silu(gate) * up) @ self.w_out[e]
            y = y.index_add(0, tok, out * gates[tok, slot].unsqueeze(1).to(x_TD.dtype))
        return y


class _LayerwiseBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = _LayerMoE(cfg.d_model, cfg.window, cfg.expert_hidden, cfg.top_k, cfg.router_renorm)


class LayerwiseMoEModel(nn.Module):
    """An ordinary MoE decoder: layer ``l`` owns experts ``[E, ...]`` and a router ``[E, D]``.

    ``cfg.window`` is the experts per layer ``E``; pool, stride and router options are ignored.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(_LayerwiseBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, idx_BS: torch.Tensor) -> torch.Tensor:
        B, S = idx_BS.shape
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = self.embed(idx_BS)
        for block in self.blocks:
            x = x + block.attn(block.attn_norm(x), cos, sin)
            x = x + block.moe(block.ffn_norm(x).view(B * S, -1)).view(B, S, -1)
        return self.lm_head(self.norm(x))


def convert_layerwise(
    state: dict[str, torch.Tensor],
    source: ModelConfig,
    *,
    target_window: int,
    router_init: str = "zero",
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A ``LayerwiseMoEModel`` state dict -> (config, state dict) of an equivalent ``MoUEModel``.

    The converted config has ``window = target_window``; build the model and call
    ``model.set_window(E)`` (or follow a ``WindowSchedule``) to start at the original width, where
    its logits equal the source model's.
    """
    L, E = source.n_layers, source.window
    P = L * E
    if not E <= target_window <= P:
        raise ConfigError("convert.target_window", target_window,
                          f"must be in [experts per layer ({E}), L*E ({P})]")
    if router_init not in ("zero", "copy"):
        raise ConfigError("convert.router_init", router_init, "must be one of zero, copy")
    cfg = layerwise_config(source, E).replace(window=target_window, router="softmax")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".moe." not in key:
            out[key] = value.clone()
    out["moe.pool.w_in_PDF2"] = torch.cat([state[f"blocks.{l}.moe.w_in"] for l in range(L)])
    out["moe.pool.w_out_PFD"] = torch.cat([state[f"blocks.{l}.moe.w_out"] for l in range(L)])
    routers_LED = torch.stack([state[f"blocks.{l}.moe.router.weight"] for l in range(L)])
    out["moe.router.weight_LWD"] = _widen_router(routers_LED, target_window, router_init)
    return cfg, out


def _widen_router(routers_LED: torch.Tensor, target_window: int, router_init: str) -> torch.Tensor:
    """Per-layer router rows for windows of ``target_window`` slots on the layerwise ring.

    Slot ``j`` of layer ``l`` scores pool expert ``p = (l*E + j) mod P``, owned by layer ``p // E``
    as its expert ``p % E``: the first ``E`` slots are the layer's own rows; the others start at
    zero or as a copy of the owner's row.
    """
    L, E, D = routers_LED.shape
    P = L * E
    weight = routers_LED.new_zeros(L, target_window, D)
    weight[:, :E] = routers_LED
    if router_init == "copy":
        for l in range(L):
            for j in range(E, target_window):
                owner, e = divmod((l * E + j) % P, E)
                weight[l, j] = routers_LED[owner, e]
    return weight


def widen_layerwise(
    state: dict[str, torch.Tensor], base: ModelConfig, *, target_window: int, router_init: str = "zero"
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A ``MoUEModel`` state dict with the layerwise topology (``P = L*E, w = s = E``) -> the same
    model with windows of ``target_window`` (start it at ``w = E``: identical logits)."""
    L, E = base.n_layers, base.window
    if base.ffn != "moe" or base.pool_size != L * E or base.stride != E % base.pool_size or base.router_shared:
        raise ConfigError("convert.base", f"P={base.pool_size}, w={E}, s={base.stride}",
                          "must be a layerwise MoE (P = L*E, w = s = E, per-layer softmax router)")
    if not E <= target_window <= L * E:
        raise ConfigError("convert.target_window", target_window, f"must be in [experts per layer ({E}), L*E ({L * E})]")
    if router_init not in ("zero", "copy"):
        raise ConfigError("convert.router_init", router_init, "must be one of zero, copy")
    out = dict(state)
    out["moe.router.weight_LWD"] = _widen_router(state["moe.router.weight_LWD"], target_window, router_init)
    if "moe.router.bias_LW" in state:
        bias = state["moe.router.bias_LW"]
        out["moe.router.bias_LW"] = torch.cat([bias, bias.new_zeros(L, target_window - E)], dim=1)
    return base.replace(window=target_window), out


@dataclass(frozen=True, kw_only=True)
class WindowSchedule:
    """Linear widening of the active window from ``start`` to ``end`` between two steps."""

    start: int
    end: int
    start_step: int = 0
    end_step: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.end:
            raise ConfigError("train.window_schedule.start", self.start,
                              f"must be in [1, end ({self.end})]")
        if not 0 <= self.start_step <= self.end_step:
            raise ConfigError("train.window_schedule.end_step", self.end_step,
                              f"must be >= start_step ({self.start_step}) >= 0")

    def window_at(self, step: int) -> int:
        """Active window width at optimizer step ``step`` (rounded down, clamped)."""
        if step <= self.start_step or self.end_step == self.start_step:
            return self.start if step <= self.start_step else self.end
        frac = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return self.start + int(frac * (self.end - self.start))
