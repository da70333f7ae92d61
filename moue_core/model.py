"""The decoder of the moue family (docs/MODEL.md section 4).

Pre-norm blocks: RMSNorm -> causal multi-head attention with RoPE (``scaled_dot_product_attention``)
-> residual -> RMSNorm -> FFN -> residual. The FFN is a dense SwiGLU (dense baselines, and the dense
layers of ``dense_first`` / ``moe_every``) or the routed mixture over the model's one shared expert
pool (``moue.moe.MoE``), plus ``n_s`` always-on shared experts private to the layer. Untied input/output embeddings; byte vocabulary by default.

Legend: ``B`` batch, ``S`` sequence, ``T = B*S`` tokens, ``D`` width, ``H`` heads, ``V`` vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moue.config import ModelConfig
from moue.fused import RMSNorm, apply_rope
from moue.moe import MoE, RouterStats, SwiGLU

__all__ = ["MoUEModel", "ModelOutput"]


def rope_tables(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y_BHSd.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, moe: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if not moe:  # a dense model, or a dense layer among MoE layers (dense_first, moe_every)
            self.mlp = SwiGLU(cfg.d_model, cfg.dense_hidden)
        elif cfg.n_shared:
            self.shared = SwiGLU(cfg.d_model, cfg.n_shared * cfg.expert_hidden)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    aux_loss: torch.Tensor  # balance + z-loss (0 for dense models)
    stats: RouterStats | None  # None for dense models


class MoUEModel(nn.Module):
    """A decoder whose MoE layers share one expert pool through ring windows."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        moe_layers = set(cfg.moe_layers)
        self.blocks = nn.ModuleList(Block(cfg, moe=layer in moe_layers) for layer in range(cfg.n_layers))
        self.moe = MoE(cfg) if cfg.ffn == "moe" else None
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)

    def forward(self, idx_BS: torch.Tensor) -> ModelOutput:
        B, S = idx_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x_BSD = self.embed(idx_BS)
        state = self.moe.router.initial_state(x_BSD.view(B * S, -1)) if self.moe else None
        routes = []
        for block in self.blocks:
            x_BSD = x_BSD + block.attn(block.attn_norm(x_BSD), cos, sin)
            h_BSD = block.ffn_norm(x_BSD)
            if hasattr(block, "mlp"):  # the router's state passes a dense layer unchanged
                x_BSD = x_BSD + block.mlp(h_BSD)
                continue
            # the router, its windows and the balance losses index MoE layers only
            y_TD, route, state = self.moe(len(routes), h_BSD.view(B * S, -1), state)
            routes.append(route)
            if self.cfg.n_shared:
                y_TD = y_TD + block.shared(h_BSD).view(B * S, -1)
            x_BSD = x_BSD + y_TD.view(B, S, -1)
        logits = self.lm_head(self.norm(x_BSD))
        if self.moe is None:
            return ModelOutput(logits=logits, aux_loss=logits.new_zeros(()), stats=None)
        aux, stats = self.moe.finish(routes)
        return ModelOutput(logits=logits, aux_loss=aux, stats=stats)

    def compile_regions(self) -> None:
        """``torch.compile`` the parts of the model whose shapes do not depend on the routing, in
        place (``nn.Module.compile``: parameters and state-dict keys unchanged): each block's norms,
        attention and dense or shared FFN, the router, the final norm and the head. The MoE's
        dispatch and experts (data-dependent group sizes) stay eager. Compiling the whole model
        instead breaks its graph at every MoE layer: measured on the quickstart trial (2-core AMD
        EPYC), a step took 0.97x eager's time that way and 0.82-0.90x this way, with 3x shorter
        warm-up (``moue bench train --compile``). That was against the composite RoPE and RMSNorm;
        against the fused eager ones (``moue.fused``), a compiled step on a 2-core Xeon was
        1.06-1.13x faster than eager (studies/LOG.md, 2026-12-07)."""
        regions: list[nn.Module] = [self.norm, self.lm_head]
        for block in self.blocks:
            regions += [block.attn_norm, block.attn, block.ffn_norm]
            regions += [getattr(block, name) for name in ("mlp", "shared") if hasattr(block, name)]
        if self.moe is not None:
            regions.append(self.moe.router)
        for module in regions:
            module.compile()

    def set_window(self, window: int) -> None:
        """Active window width (window-widening schedule of converted models)."""
        if self.moe is not None:
            self.moe.set_window(window)
