"""Counting (docs/MODEL.md section 6): every number a study logs about a model's size and compute.

All counts come from the config alone (pure Python, no model is built), so a dry run can price a
thousand trials in milliseconds; ``check_counts`` verifies them against a built model's
``sum(p.numel())``.

Conventions (``CONVENTION`` is logged as ``count.convention``; analysis never mixes conventions):

- ``n_params_embedding``: input embedding + unembedding, ``2 * V * D`` (untied).
- ``n_params_total``: every other stored parameter (attention, norms, routers, the whole pool,
  shared experts, dense FFNs); ``n_params_total + n_params_embedding == sum(p.numel())``.
- ``n_params_active``: non-embedding parameters one token uses, **counted once per application**:
  attention, norms, the router rows of its layer's window (``w * D`` per layer; the trajectory
  router adds its per-layer projection, the shared GRU once per layer it runs in, and the ``w``
  expert keys), ``k`` routed experts and ``n_s`` shared experts per layer (or the dense FFN). It is
  the N of ``C = 6 N D`` (Kaplan et al. 2020), a measure of the work per token, not of distinct
  weights: a weight shared across depth (a pool expert two layers pick, a shared router row, the
  GRU) counts at every layer that applies it. So a model that reuses weights across depth, which
  is what universal experts do, can have ``n_params_active > n_params_total`` (the dry run says so);
  iso-active matching compares work per token, the quantity scaling laws are written in.
- ``flops_per_token`` (training, forward + backward): ``6 * n_params_active`` (Kaplan et al. 2020,
  2 FLOPs per multiply-add forward, twice that backward) ``+ 6 * L * S * D`` for attention scores
  and values over a context of ``S`` tokens (Kaplan's ``2 n_layer n_ctx d_attn`` forward, times 3,
  no causal halving) ``+ 6 * D * V`` for the unembedding. ``compute = flops_per_token * tokens``.
- A GRU layer counted as its matrices and biases, applied once per layer (trajectory router).
- Dense layers among MoE layers (``dense_first``, ``moe_every``) count their SwiGLU in both totals;
  the router, the ``k`` experts, shared experts and the topology count MoE layers only.
- Expert-choice and unified routing (``routing``) give a token ``k`` experts on average (``T * k``
  pairs per layer), so they count as top-k; a capacity factor is counted dropless (upper bound).
- Topology (``moue.topology``, both window layouts): ``virtual_width = L * w``,
  ``physical_width = P``, ``reuse = V / P``, ``log10_paths = L * log10 C(w, k)`` (the same for
  ``ring`` and ``clamped``: both give every layer ``w`` experts); ``exposure_min`` / ``exposure_max``
  and ``unreachable`` (experts in no window) from the windows themselves, which is where the
  layouts differ (a clamped layout piles its last windows at the end of the pool).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moue.config import ModelConfig

__all__ = ["CONVENTION", "Counts", "count", "check_counts"]

CONVENTION = "moue-v1:6N_active+6LSD+6DV"


@dataclass(frozen=True, kw_only=True)
class Counts:
    n_params_total: int
    n_params_active: int
    n_params_embedding: int
    flops_per_token: int
    virtual_width: int
    physical_width: int
    reuse: float
    log10_paths: float
    exposure_min: int
    exposure_max: int
    unreachable: int
    seq_len: int
    convention: str = CONVENTION

    def compute(self, tokens: int) -> int:
        """Training FLOPs for ``tokens`` tokens."""
        return self.flops_per_token * tokens

    def as_params(self) -> dict[str, float | int]:
        """Flat ``derived.*`` names of docs/TRACKING.md."""
        skip = {"convention", "seq_len"}
        return {f"derived.{k}": v for k, v in asdict(self).items() if k not in skip}


def _router_params(cfg: ModelConfig, *, active: bool) -> int:
    L, P, W, D = cfg.n_moe_layers, cfg.pool_size, cfg.window, cfg.d_model
    if active:
        n = L * W * D  # the window rows each layer scores
    else:
        n = P * D if cfg.router_shared else L * W * D
    return n + _ROUTER_KIND_PARAMS[cfg.router](cfg, active)


def _trajectory_params(cfg: ModelConfig, active: bool) -> int:
    """Per-layer projections ``A_l``, one GRU cell (applied at every layer), universal keys ``U``."""
    L, P, W, D, R = cfg.n_moe_layers, cfg.pool_size, cfg.window, cfg.d_model, cfg.router_state_dim
    gru = 2 * (3 * R * R) + 2 * (3 * R)  # weight_ih, weight_hh, bias_ih, bias_hh
    return L * R * D + (L * gru if active else gru) + (L * W * R if active else P * R)


# model.router -> the parameters its kind adds to the window scoring (moue.router.KINDS)
_ROUTER_KIND_PARAMS = {
    "softmax": lambda cfg, active: 0,
    "norm": lambda cfg, active: 1,  # sigma
    "trajectory": _trajectory_params,
    "sigmoid": lambda cfg, active: 0,
}


def count(cfg: ModelConfig, *, seq_len: int | None = None) -> Counts:
    """All counts of ``cfg`` for training at context ``seq_len`` (default ``cfg.max_seq_len``)."""
    S = cfg.max_seq_len if seq_len is None else seq_len
    L, D, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    trunk = L * (4 * D * D + 2 * D) + D  # attention (qkv + out), two norms per block, final norm
    embedding = 2 * V * D
    if cfg.ffn == "dense":
        ffn = L * 3 * D * cfg.dense_hidden
        total = active = trunk + ffn
        virtual = physical = exp_min = exp_max = unreachable = 0
        reuse = paths = 0.0
    else:
        expert, L_moe = 3 * D * cfg.expert_hidden, cfg.n_moe_layers
        shared = L_moe * cfg.n_shared * expert
        dense = (L - L_moe) * 3 * D * cfg.dense_hidden  # dense layers among the MoE layers
        total = trunk + dense + cfg.pool_size * expert + shared + _router_params(cfg, active=False)
        active = trunk + dense + L_moe * cfg.top_k * expert + shared + _router_params(cfg, active=True)
        topo = cfg.topology
        virtual, physical, reuse = topo.virtual_width, topo.physical_width, topo.reuse
        paths = topo.log10_paths(cfg.top_k)
        exp_min, exp_max, unreachable = min(topo.exposure), max(topo.exposure), topo.unreachable
    flops = 6 * active + 6 * L * S * D + 6 * D * V
    return Counts(
        n_params_total=total, n_params_active=active, n_params_embedding=embedding,
        flops_per_token=flops, virtual_width=virtual, physical_width=physical, reuse=reuse,
        log10_paths=paths, exposure_min=exp_min, exposure_max=exp_max, unreachable=unreachable, seq_len=S,
    )


def check_counts(model, cfg: ModelConfig) -> Counts:
    """``count(cfg)`` after asserting its parts sum to the built model's ``sum(p.numel())``."""
    counts = count(cfg)
    numel = sum(p.numel() for p in model.parameters())
    if counts.n_params_total + counts.n_params_embedding != numel:
        raise AssertionError(
            f"counting is wrong: total {counts.n_params_total} + embedding "
            f"{counts.n_params_embedding} != sum(p.numel()) {numel}"
        )
    return counts
