"""Which experts each layer may use: the ring-window topology of docs/MODEL.md section 1.

Experts sit on a ring ``0 .. P-1``. Layer ``l`` sees the window

    C_l = { (o_l + j) mod P : j = 0 .. w-1 },   o_l = (s * floor(l / g)) mod P

One formula covers the known architectures (see ``layerwise``, ``unipool``, ``grouped``,
``adjacent`` below), which is why it is the single topology abstraction of moue.

Derived quantities (logged with every run, docs/MODEL.md section 1):

- virtual width ``V = L * w`` (expert slots a token can reach across depth);
- physical width ``P``;
- reuse ``rho = V / P``;
- exposure ``n_j = |{l : j in C_l}|`` per expert;
- routing paths ``log10 paths = L * log10 C(w, k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from moue_core.errors import ConfigError

__all__ = ["Topology", "layerwise", "unipool", "grouped", "adjacent"]


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Ring windows for ``n_layers`` layers over a pool of ``pool_size`` experts."""

    n_layers: int
    pool_size: int
    window: int
    stride: int
    group: int = 1

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ConfigError("model.n_layers", self.n_layers, "must be >= 1")
        if self.pool_size < 1:
            raise ConfigError("model.pool_size", self.pool_size, "must be >= 1")
        if not 1 <= self.window <= self.pool_size:
            raise ConfigError(
                "model.window", self.window, f"must be in [1, pool_size ({self.pool_size})]"
            )
        if not 0 <= self.stride < self.pool_size:
            raise ConfigError(
                "model.stride", self.stride, f"must be in [0, pool_size ({self.pool_size}))"
            )
        if self.group < 1:
            raise ConfigError("model.group", self.group, "must be >= 1")

    def offset(self, layer: int) -> int:
        """First expert of layer ``layer``'s window: ``(s * floor(l / g)) mod P``."""
        return (self.stride * (layer // self.group)) % self.pool_size

    def window_ids(self, layer: int, window: int | None = None) -> list[int]:
        """Pool ids of layer ``layer``'s window, in window order (``window`` overrides ``w``)."""
        w = self.window if window is None else window
        o = self.offset(layer)
        return [(o + j) % self.pool_size for j in range(w)]

    @cached_property
    def exposure(self) -> tuple[int, ...]:
        """``n_j``: how many layers can route to expert ``j``."""
        n = [0] * self.pool_size
        for layer in range(self.n_layers):
            for j in self.window_ids(layer):
                n[j] += 1
        return tuple(n)

    @property
    def virtual_width(self) -> int:
        return self.n_layers * self.window

    @property
    def physical_width(self) -> int:
        return self.pool_size

    @property
    def reuse(self) -> float:
        return self.virtual_width / self.pool_size

    @property
    def unreachable(self) -> int:
        """Experts no layer can route to (dead weight)."""
        return sum(1 for n in self.exposure if n == 0)

    def log10_paths(self, top_k: int) -> float:
        """``L * log10 C(w, k)``: routing paths of one token through the whole depth."""
        return self.n_layers * math.log10(math.comb(self.window, top_k))


# The special cases of docs/MODEL.md's table, as (P, w, s, g) for a depth of L layers.


def layerwise(n_layers: int, experts_per_layer: int) -> Topology:
    """Ordinary MoE: ``E`` private experts per layer (``P = L*E, w = E, s = E``)."""
    e = experts_per_layer
    return Topology(n_layers=n_layers, pool_size=n_layers * e, window=e, stride=e % (n_layers * e))


def unipool(n_layers: int, pool_size: int) -> Topology:
    """UniPool: every layer routes over the whole pool (``w = P, s = 0``)."""
    return Topology(n_layers=n_layers, pool_size=pool_size, window=pool_size, stride=0)


def grouped(n_layers: int, experts_per_layer: int, n_groups: int) -> Topology:
    """``G`` groups of ``L/G`` consecutive layers, each group sharing ``P/G`` experts."""
    if n_groups < 1 or n_layers % n_groups:
        raise ConfigError("n_groups", n_groups, f"must divide n_layers ({n_layers})")
    p = n_layers * experts_per_layer
    w = p // n_groups
    return Topology(n_layers=n_layers, pool_size=p, window=w, stride=w % p, group=n_layers // n_groups)


def adjacent(n_layers: int, experts_per_layer: int, reach: int) -> Topology:
    """ReXMoE-like: each layer sees ``r`` adjacent layers' experts (``w = r*E, s = E``)."""
    e = experts_per_layer
    return Topology(n_layers=n_layers, pool_size=n_layers * e, window=reach * e, stride=e % (n_layers * e))
