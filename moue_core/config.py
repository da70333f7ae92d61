"""The typed model configuration of the moue family (docs/MODEL.md).

``ModelConfig`` is frozen and keyword-only; ``__post_init__`` validates every field and every
combination, raising ``ConfigError`` with the field, the value and what is allowed, e.g.
``model.top_k (9) must be <= model.window (8)``. Dicts from TOML or Ray become a ``ModelConfig``
at the edge (``ModelConfig.from_dict``) and never travel further inward.

Notation (docs/MODEL.md): ``L`` layers, ``d`` width, ``P`` pool size, ``f`` expert hidden size, ``k``
top-k, ``w`` window, ``s`` stride, ``g`` layers per rotation step, ``n_s`` shared experts.

Per-router defaults. ``z_loss_coef = None`` (the default) means "what this router's reference
uses" (``Z_LOSS_DEFAULTS``): ``softmax`` 1e-3 (ST-MoE, Zoph et al. 2022), ``trajectory`` 1e-3 (it
selects like ``softmax``; MoUE publishes no value), ``norm`` 0 (UniPool's NormRouter: its selection
ignores the scale of the logits, so a z-loss, like weight decay, only shrinks the router weights;
UniPool's scripts set no z-loss), ``sigmoid`` 0 (DeepSeek-V3 uses none). ``__post_init__`` resolves it, so the field (and ``to_dict``, and
the logged param) holds the number that is used; ``replace`` resolves a defaulted field again for
the new router.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from moue.errors import ConfigError
from moue.fields import build, choice, integer, is_int, number
from moue.topology import LAYOUTS, Topology

__all__ = ["ModelConfig", "ROUTERS", "ROUTINGS", "BIAS_SCOPES", "BALANCES", "FFNS", "DISPATCHES", "LAYOUTS",
           "Z_LOSS_DEFAULTS"]

ROUTERS = ("softmax", "norm", "trajectory", "sigmoid")
ROUTINGS = ("token", "expert", "unified")
BIAS_SCOPES = ("layer", "pool")
BALANCES = ("switch", "pool", "exposure", "none")
FFNS = ("moe", "dense")
DISPATCHES = ("auto", "grouped_mm", "triton")
# model.router -> its z-loss coefficient when model.z_loss_coef is unset (module docstring)
Z_LOSS_DEFAULTS = {"softmax": 1e-3, "trajectory": 1e-3, "norm": 0.0, "sigmoid": 0.0}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One model of the family. Defaults: a small MoUE-style rotational pool.

    ``z_loss_coef`` defaults per router to what its reference uses (``Z_LOSS_DEFAULTS``: 1e-3 for
    ``softmax`` and ``trajectory``, none for ``norm``, as UniPool); the field holds the resolved
    value. ``window_layout`` is ``ring`` (windows wrap) or ``clamped`` (they stop at the end of the
    pool, as UniPool's ``sliding`` mode; ``moue.topology``)."""

    # trunk
    vocab_size: int = 256  # byte-level vocabulary
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256  # RoPE table length
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # feed-forward
    ffn: Literal["moe", "dense"] = "moe"
    dense_hidden: int = 512  # SwiGLU hidden size of dense baselines (ffn = "dense")
    # expert pool and topology (docs/MODEL.md section 1)
    pool_size: int = 16
    window: int = 8
    stride: int = 4
    group: int = 1
    window_layout: Literal["ring", "clamped"] = "ring"  # windows wrap (ring) or stop at the pool's end
    top_k: int = 2
    expert_hidden: int = 128
    n_shared: int = 0  # always-on shared experts per layer (layer-private)
    require_reachable: bool = False  # reject (not warn) pools with unreachable experts
    # router (docs/MODEL.md section 2)
    router: Literal["softmax", "norm", "trajectory"] = "softmax"
    router_renorm: bool = True  # softmax/trajectory: renormalise gates over the selected k
    router_shared: bool = False  # one router matrix for all layers (Omni-Router)
    router_state_dim: int = 64  # trajectory router: GRU state size d_r
    routing: Literal["token", "expert", "unified"] = "token"  # who chooses: tokens, experts, or both (USMoE)
    routing_alpha: float = 0.5  # unified routing: weight of the token-choice score
    capacity_factor: float = 0.0  # 0: dropless; else expert capacity ceil(c * T * k / w), overflow dropped
    expert_bias: bool = False  # aux-loss-free balancing bias (DeepSeek-V3), selection only
    expert_bias_rate: float = 1e-3
    expert_bias_scope: Literal["layer", "pool"] = "layer"  # one bias per layer slot, or per pool expert
    # dense layers among MoE layers
    dense_first: int = 0  # the first layers are dense
    moe_every: int = 1  # then every n-th layer is an MoE layer
    # balance losses (docs/MODEL.md section 3)
    balance: Literal["switch", "pool", "exposure", "none"] = "switch"
    balance_coef: float = 1e-2
    balance_prev_batch: bool = True  # pool, exposure: pooled load of the previous micro-batch (UniPool)
    balance_depth_weights: tuple[float, ...] = ()  # exposure loss: gamma_l per layer (empty: all 1)
    z_loss_coef: float | None = None  # None: the router's default (Z_LOSS_DEFAULTS; 0 for norm)
    # dispatch (docs/MODEL.md section 5)
    dispatch: Literal["auto", "grouped_mm", "triton"] = "auto"  # auto: Triton on CUDA, grouped_mm on CPU

    def __post_init__(self) -> None:
        choice("model.router", self.router, ROUTERS)
        defaulted = []
        if self.z_loss_coef is None:
            object.__setattr__(self, "z_loss_coef", Z_LOSS_DEFAULTS[self.router])
            defaulted.append("z_loss_coef")
        elif is_int(self.z_loss_coef):  # TOML's 0 is the float 0.0 (fields.build cannot tell from None)
            object.__setattr__(self, "z_loss_coef", float(self.z_loss_coef))
        object.__setattr__(self, "_router_defaults", tuple(defaulted))  # not a field: replace() reads it
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "dense_hidden",
                     "pool_size", "window", "group", "top_k", "expert_hidden", "router_state_dim"):
            integer(f"model.{name}", getattr(self, name), 1)
        for name in ("balance_coef", "z_loss_coef", "expert_bias_rate", "init_std", "norm_eps"):
            number(f"model.{name}", getattr(self, name), 0, finite=False)
        number("model.capacity_factor", self.capacity_factor, 0)
        number("model.routing_alpha", self.routing_alpha, 0, 1)
        integer("model.dense_first", self.dense_first, 0)
        integer("model.moe_every", self.moe_every, 1)
        if not is_int(self.stride):
            raise ConfigError("model.stride", self.stride, "must be an integer >= 0")
        integer("model.n_shared", self.n_shared, 0)
        if self.rope_theta <= 0:
            raise ConfigError("model.rope_theta", self.rope_theta, "must be > 0")
        for name, allowed in (("ffn", FFNS), ("router", ROUTERS), ("balance", BALANCES), ("dispatch", DISPATCHES),
                              ("window_layout", LAYOUTS), ("routing", ROUTINGS), ("expert_bias_scope", BIAS_SCOPES)):
            choice(f"model.{name}", getattr(self, name), allowed)
        self._check_options()
        gammas = self.balance_depth_weights
        if not isinstance(gammas, tuple) or (gammas and (
                len(gammas) != self.n_moe_layers or not all(isinstance(g, (int, float)) and g > 0 for g in gammas))):
            raise ConfigError("model.balance_depth_weights", gammas,
                              f"must be empty or {self.n_moe_layers} positive numbers (one per MoE layer)")
        if gammas and self.balance != "exposure":
            raise ConfigError("model.balance_depth_weights", gammas, "applies only to balance = 'exposure'")
        if self.d_model % self.n_heads:
            raise ConfigError("model.n_heads", self.n_heads, f"must divide d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                "model.n_heads", self.n_heads,
                f"must leave an even head size for RoPE (d_model / n_heads = {self.d_model // self.n_heads})",
            )
        # grouped_mm on fp32 CPU needs the inner dims to be multiples of 4 (docs/MODEL.md section 5)
        for name in ("d_model", "expert_hidden", "dense_hidden"):
            if getattr(self, name) % 4:
                raise ConfigError(f"model.{name}", getattr(self, name), "must be a multiple of 4")
        if self.ffn == "moe":
            if self.top_k > self.window:
                raise ConfigError("model.top_k", self.top_k, f"must be <= model.window ({self.window})")
            if self.window > self.pool_size:
                raise ConfigError(
                    "model.window", self.window, f"must be <= model.pool_size ({self.pool_size})"
                )
            if self.stride >= self.pool_size:
                raise ConfigError(
                    "model.stride", self.stride, f"must be in [0, model.pool_size ({self.pool_size}))"
                )
            topo = self.topology  # validates the remaining ring constraints
            if topo.unreachable:
                msg = f"{topo.unreachable} of {self.pool_size} experts are in no layer's window"
                if self.require_reachable:
                    raise ConfigError("model.stride", self.stride, f"leaves experts unreachable: {msg}")
                warnings.warn(f"model.stride ({self.stride}): {msg} (dead weight)", stacklevel=3)

    def _check_options(self) -> None:
        """The rules of the optional mechanisms (class docstring)."""
        if self.ffn == "moe" and not self.moe_layers:
            raise ConfigError("model.dense_first", self.dense_first,
                              f"leaves no MoE layer among {self.n_layers} (use ffn = 'dense' for a dense model)")
        if self.routing != "token":
            if self.router == "norm":
                raise ConfigError("model.routing", self.routing, "needs a softmax, sigmoid or trajectory router "
                                  "(NormRouter scores are per token, not comparable across tokens)")
            if self.expert_bias:
                raise ConfigError("model.expert_bias", True, f"applies to token choice only (model.routing = "
                                  f"{self.routing!r} balances by construction)")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers (all of them unless ``dense_first`` / ``moe_every`` say otherwise)."""
        if self.ffn != "moe":
            return ()
        return tuple(l for l in range(self.n_layers)
                     if l >= self.dense_first and (l - self.dense_first) % self.moe_every == 0)

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def topology(self) -> Topology:
        return Topology(n_layers=max(1, self.n_moe_layers), pool_size=self.pool_size, window=self.window,
                        stride=self.stride, group=self.group, layout=self.window_layout)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; a per-router default not set here is resolved again (so
        ``replace(router="norm")`` of a default config gets NormRouter's z-loss, not softmax's)."""
        for name in getattr(self, "_router_defaults", ()):
            changes.setdefault(name, None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (TOML, Ray); unknown keys are an error naming the key."""
        return build(cls, "model", values)
