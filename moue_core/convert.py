"""Progressive conversion of a layerwise MoE checkpoint (docs/MODEL.md section 7).

A layerwise MoE has ``E`` private experts per layer and a per-layer router ``[E, D]``. Placing the
``L*E`` trained experts on the ring in layer order (``P = L*E``, ``s = E``) with the window at its
original width ``w = E`` gives a MoUE-style model that computes exactly what the original computed.
Training then widens the window from ``E`` to a target ``w`` over a schedule (``WindowSchedule``);
router rows for newly visible experts start at zero, or copied from the router of the layer that
owned the expert (``router_init="copy"``).

The target may be any family whose gates at ``w = E`` are the source's: a ``softmax`` or
``trajectory`` router (per-layer or shared), any balance loss, z-loss, expert bias, shared experts,
either window layout. Everything the target has that the source lacks starts neutral (balancing
buffers and the trajectory keys at zero, new shared experts with a zero output projection), so the
converted state loads with ``strict=True`` and the logits are the source's (``convert_layerwise``).

Dense-to-MoE upcycling (``upcycle_dense``, Komatsuzaki et al. 2023, "Sparse upcycling"): every
expert starts as a copy of a trained dense model's FFN (plus optional noise), the trunk is copied,
the router starts fresh. Expert ``p`` copies the FFN of the first MoE layer whose window holds it. On
a layerwise target (each window holds copies of its own layer's FFN only), with no noise and
renormalised softmax gates, the upcycled model computes what the dense model computed (the gates of
identical experts sum to 1); on a shared pool a layer's window also holds other layers' copies, so
the start is close to the dense model but not equal.

``LayerwiseMoEModel`` is the source format: an ordinary per-layer MoE written independently of
``moue.moe`` (per-layer expert tensors, a naive per-expert loop), used both as the conversion
source and as the reference implementation the tests compare the shared-pool model against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moue.config import ModelConfig
from moue.errors import ConfigError
from moue.fused import RMSNorm
from moue.model import Attention, MoUEModel, rope_tables
from moue.moe import SwiGLU

__all__ = ["LayerwiseMoEModel", "WindowSchedule", "convert_layerwise", "layerwise_config", "widen_layerwise",
           "upcycle_dense"]


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
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = _LayerMoE(cfg.d_model, cfg.window, cfg.expert_hidden, cfg.top_k, cfg.router_renorm)
        if cfg.n_shared:
            self.shared = SwiGLU(cfg.d_model, cfg.n_shared * cfg.expert_hidden)


class LayerwiseMoEModel(nn.Module):
    """An ordinary MoE decoder: layer ``l`` owns experts ``[E, ...]`` and a router ``[E, D]``.

    ``cfg.window`` is the experts per layer ``E``, plus ``cfg.n_shared`` always-on shared experts
    per layer (as ``MoUEModel``'s); pool, stride and router options are ignored (they describe the
    model ``convert_layerwise`` makes of it).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(_LayerwiseBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
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
            h = block.ffn_norm(x)
            y = block.moe(h.view(B * S, -1)).view(B, S, -1)
            x = x + (y + block.shared(h) if self.cfg.n_shared else y)
        return self.lm_head(self.norm(x))


# the trunk and expert settings a conversion target must share with its source (identical logits)
_SAME_AS_SOURCE = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "rope_theta", "norm_eps",
                   "top_k", "expert_hidden", "router_renorm")
_CONVERTIBLE_ROUTERS = ("softmax", "trajectory")


def convert_layerwise(
    state: dict[str, torch.Tensor],
    source: ModelConfig,
    *,
    target_window: int,
    router_init: str = "zero",
    target: ModelConfig | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A ``LayerwiseMoEModel`` state dict -> (config, state dict) of an equivalent ``MoUEModel``.

    The target is ``target`` or, by default, ``source``'s own settings on the layerwise ring
    (``P = L*E, s = E``) with ``window = target_window``: its balance loss, z-loss, expert bias,
    shared experts, router kind and window layout. Every key the target model has is in the
    returned state (``load_state_dict(strict=True)`` works): what the source has no counterpart for
    starts neutral, so the logits at ``w = E`` are the source's: balancing buffers at zero, the
    trajectory router's expert keys at zero (its GRU and projections at their initialisation:
    with zero keys the state adds nothing to the logits), the shared experts' output projections
    at zero when the source has none. A NormRouter target is refused: its gates are not the
    source's softmax gates, so no conversion could keep the logits.

    Build the model and call ``model.set_window(E)`` (or follow a ``WindowSchedule``) to start at
    the original width, where its logits equal the source model's.
    """
    L, E = source.n_layers, source.window
    P = L * E
    if not E <= target_window <= P:
        raise ConfigError("convert.target_window", target_window,
                          f"must be in [experts per layer ({E}), L*E ({P})]")
    if router_init not in ("zero", "copy"):
        raise ConfigError("convert.router_init", router_init, "must be one of zero, copy")
    if target is None:
        target = layerwise_config(source, E).replace(window=target_window, router_shared=source.router_shared)
    _check_target(target, source, target_window, router_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # what has no source counterpart starts from a fixed initialisation
        fresh = MoUEModel(target).state_dict()
    out = {key: value.clone() for key, value in state.items() if ".moe." not in key}
    out["moe.pool.w_in_PDF2"] = torch.cat([state[f"blocks.{l}.moe.w_in"] for l in range(L)])
    out["moe.pool.w_out_PFD"] = torch.cat([state[f"blocks.{l}.moe.w_out"] for l in range(L)])
    routers_LED = torch.stack([state[f"blocks.{l}.moe.router.weight"] for l in range(L)])
    if target.router_shared:
        out["moe.router.weight_PD"] = routers_LED.reshape(P, -1).clone()  # row p: its owner's row
    else:
        out["moe.router.weight_LWD"] = _widen_router(routers_LED, target.topology, router_init)
    for key, value in fresh.items():
        if key not in out:  # neutral starts (docstring)
            zero = key == "moe.router.keys_PR" or (".shared." in key and key.endswith("w_out.weight"))
            out[key] = torch.zeros_like(value) if zero else value
    extra = sorted(set(out) - set(fresh))
    if extra:
        raise ConfigError("model.n_shared", target.n_shared, f"leaves source weights without a place: {extra[0]}")
    for key, value in fresh.items():
        if out[key].shape != value.shape:
            raise ConfigError("convert.source", key, f"has shape {tuple(out[key].shape)}, the target needs "
                              f"{tuple(value.shape)}")
    return target, out


def _check_target(target: ModelConfig, source: ModelConfig, target_window: int, router_init: str) -> None:
    """A conversion target must keep the source's trunk, experts and gates, on the layerwise ring."""
    L, E = source.n_layers, source.window
    for name in _SAME_AS_SOURCE:
        if getattr(target, name) != getattr(source, name):
            raise ConfigError(f"model.{name}", getattr(target, name),
                              f"must equal the layerwise source's ({getattr(source, name)}) to keep its logits")
    expect = {"ffn": "moe", "pool_size": L * E, "stride": E % (L * E), "group": 1, "window": target_window,
              "dense_first": 0, "moe_every": 1, "routing": "token", "capacity_factor": 0.0}
    for name, value in expect.items():
        if getattr(target, name) != value:
            raise ConfigError(f"model.{name}", getattr(target, name),
                              f"must be {value!r} for a conversion of the layerwise MoE (P = L*E, s = E, g = 1, "
                          "every layer MoE, token choice, dropless: the logits at w = E must be the source's)")
    if target.router not in _CONVERTIBLE_ROUTERS:
        raise ConfigError("model.router", target.router,
                          "must be softmax or trajectory for a conversion target (NormRouter gates differ from "
                          "the layerwise softmax gates, so no converted model would keep the logits)")
    if target.router_shared and router_init == "zero":
        raise ConfigError("convert.router_init", router_init,
                          "must be copy for a shared router (model.router_shared: each expert has one row, its owner's)")


def _widen_router(routers_LED: torch.Tensor, topo, router_init: str) -> torch.Tensor:
    """Per-layer router rows for the windows of ``topo`` over the layerwise pool (``P = L*E``).

    Slot ``j`` of layer ``l`` scores pool expert ``p = topo.window_ids(l)[j]``, owned by layer
    ``p // E`` as its expert ``p % E``: the layer's own experts keep its rows (they are its first
    ``E`` slots in both layouts, ``moue.topology``); the others start at zero or as a copy of
    the owner's row.
    """
    L, E, D = routers_LED.shape
    weight = routers_LED.new_zeros(L, topo.window, D)
    for l in range(L):
        for j, p in enumerate(topo.window_ids(l)):
            owner, e = divmod(p, E)
            if owner == l or router_init == "copy":
                weight[l, j] = routers_LED[owner, e]
    return weight


def _widen_bias(bias_LE: torch.Tensor, topo) -> torch.Tensor:
    """Expert-bias buffer for the wider windows: the layer's own slots keep theirs, new ones start at 0."""
    L, E = bias_LE.shape
    bias = bias_LE.new_zeros(L, topo.window)
    for l in range(L):
        for j, p in enumerate(topo.window_ids(l)):
            if p // E == l:
                bias[l, j] = bias_LE[l, p % E]
    return bias


def widen_layerwise(
    state: dict[str, torch.Tensor], base: ModelConfig, *, target_window: int, router_init: str = "zero"
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A ``MoUEModel`` state dict with the layerwise topology (``P = L*E, w = s = E``) -> the same
    model with windows of ``target_window`` (start it at ``w = E``: identical logits).

    Every router kind and balance option carries over: per-layer router rows and the expert-bias
    buffer get the new slots (zero, or the owner's rows with ``router_init="copy"``); a shared
    router, the trajectory router's keys and the pool-level balancing buffers are per pool expert
    and stay as they are (a shared router's rows are necessarily the owners': ``copy`` only)."""
    L, E = base.n_layers, base.window
    if (base.ffn != "moe" or base.pool_size != L * E or base.stride != E % base.pool_size or base.group != 1
            or base.n_moe_layers != L):
        raise ConfigError("convert.base", f"P={base.pool_size}, w={E}, s={base.stride}, g={base.group}",
                          "must be a layerwise MoE (P = L*E, w = s = E, g = 1)")
    if not E <= target_window <= L * E:
        raise ConfigError("convert.target_window", target_window, f"must be in [experts per layer ({E}), L*E ({L * E})]")
    if router_init not in ("zero", "copy"):
        raise ConfigError("convert.router_init", router_init, "must be one of zero, copy")
    if base.router_shared and router_init == "zero":
        raise ConfigError("convert.router_init", router_init,
                          "must be copy for a shared router (model.router_shared: each expert has one row, its owner's)")
    cfg = base.replace(window=target_window)
    out = dict(state)
    if not base.router_shared:
        out["moe.router.weight_LWD"] = _widen_router(state["moe.router.weight_LWD"], cfg.topology, router_init)
    if "moe.router.bias_LW" in state:
        out["moe.router.bias_LW"] = _widen_bias(state["moe.router.bias_LW"], cfg.topology)
    return cfg, out


# the trunk settings an upcycled model keeps from its dense source
_UPCYCLE_SAME = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "rope_theta", "norm_eps")


def upcycle_dense(
    state: dict[str, torch.Tensor], source: ModelConfig, target: ModelConfig, *, noise: float = 0.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A dense ``MoUEModel`` state dict (``ffn = "dense"``) -> a state dict of the MoE ``target``.

    The trunk (embeddings, attention, norms, head) is copied. Pool expert ``p`` is a copy of the
    dense FFN of its owner, the first MoE layer whose window holds it (layer 0's for an expert no
    window holds), times ``1 + noise * N(0, 1)`` elementwise (``noise = 0``: exact copies); dense
    layers of the target (``dense_first`` / ``moe_every``) keep their own FFN. The router, the
    trajectory router's parameters and the balancing buffers start at the target's
    initialisation (seed ``seed``), shared experts with a zero output projection (they add
    nothing at the start). ``target.expert_hidden`` and ``target.dense_hidden`` must equal the
    source's ``dense_hidden``. Loads into ``MoUEModel(target)`` with ``strict=True``."""
    if source.ffn != "dense":
        raise ConfigError("convert.source", source.ffn, "must be a dense model (model.ffn = 'dense') to upcycle")
    if target.ffn != "moe":
        raise ConfigError("model.ffn", target.ffn, "must be moe for an upcycling target")
    for name in _UPCYCLE_SAME:
        if getattr(target, name) != getattr(source, name):
            raise ConfigError(f"model.{name}", getattr(target, name),
                              f"must equal the dense source's ({getattr(source, name)}) to upcycle it")
    for name in ("expert_hidden", "dense_hidden"):
        if getattr(target, name) != source.dense_hidden:
            raise ConfigError(f"model.{name}", getattr(target, name),
                              f"must equal the dense source's model.dense_hidden ({source.dense_hidden})")
    if not noise >= 0:
        raise ConfigError("convert.noise", noise, "must be a number >= 0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = MoUEModel(target).state_dict()
        out = {key: value.clone() for key, value in state.items() if ".mlp." not in key}
        layers, topo = target.moe_layers, target.topology
        owner_P = [0] * target.pool_size
        for i in reversed(range(len(layers))):  # the first layer that holds p wins
            for p in topo.window_ids(i):
                owner_P[p] = layers[i]
        w_in, w_out = [], []
        for p in range(target.pool_size):
            layer = owner_P[p]
            w_in.append(state[f"blocks.{layer}.mlp.w_in.weight"].t())  # [D, 2F]
            w_out.append(state[f"blocks.{layer}.mlp.w_out.weight"].t())  # [F, D]
        w_in_PDF2, w_out_PFD = torch.stack(w_in), torch.stack(w_out)
        if noise:
            w_in_PDF2 = w_in_PDF2 * (1 + noise * torch.randn_like(w_in_PDF2))
            w_out_PFD = w_out_PFD * (1 + noise * torch.randn_like(w_out_PFD))
    out["moe.pool.w_in_PDF2"], out["moe.pool.w_out_PFD"] = w_in_PDF2.contiguous(), w_out_PFD.contiguous()
    moe_layers = set(layers)
    for layer in range(target.n_layers):
        if layer not in moe_layers:
            for name in ("w_in", "w_out"):
                out[f"blocks.{layer}.mlp.{name}.weight"] = state[f"blocks.{layer}.mlp.{name}.weight"].clone()
    for key, value in fresh.items():
        if key not in out:
            zero = ".shared." in key and key.endswith("w_out.weight")
            out[key] = torch.zeros_like(value) if zero else value
    extra = sorted(set(out) - set(fresh))
    if extra:
        raise ConfigError("convert.source", extra[0], "has no place in the upcycled model")
    return out


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
