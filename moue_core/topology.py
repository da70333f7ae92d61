"""Which experts each layer may use: the staggered windows of docs/MODEL.md section 1.

Experts are numbered ``0 .. P-1``; layer ``l``'s window starts at ``u_l = s * floor(l / g)`` and
holds ``w`` experts. Two layouts (``layout``):

- ``ring`` (the default): experts sit on a ring and the window wraps,

      C_l = { (o_l + j) mod P : j = 0 .. w-1 },   o_l = u_l mod P

  so with ``L = 6, P = 24, w = 8, s = 4`` layer 5 sees ``{20..23, 0..3}``: half of layer 0's window.
- ``clamped``: windows slide without wrapping and stop at the end of the pool,

      C_l = { o_l + j : j = 0 .. w-1 },   o_l = min(u_l, P - w)

  (the example's layer 5 sees ``{16..23}``, nothing of layer 0's ``{0..7}``). This follows UniPool's
  ``sliding`` pool mode, whose per-layer window is clamped at the first and last layer instead of
  wrapping (Centaurus-Alpha/UniPool, ``megatron/core/transformer/moe/moe_utils.py``,
  ``get_moe_pool_windows``). Unlike UniPool's, a clamped window keeps its width ``w`` (UniPool's
  edge windows shrink), so every layer routes over ``w`` experts and the active count, the routing
  paths and the ``top_k <= w`` rule are those of the ring.

Slot order. Slot ``j`` of a window is expert ``(o_l + j) mod P`` on the ring. A clamped window
whose start moved back (``o_l < u_l``) is rotated so that its first slot is still the layer's own
start ``min(u_l, P - 1)``: slot ``j`` is ``o_l + (r_l + j) mod w``, ``r_l = min(u_l, P - 1) - o_l``.
The set is the same; the order matters only for a narrower active window (its first ``w'`` slots),
which keeps a converted layerwise model's own experts first in both layouts (``moue.convert``).

One formula covers the known architectures (see ``layerwise``, ``unipool``, ``grouped``,
``adjacent`` below), which is why it is the single topology abstraction of moue.

Derived quantities (logged with every run, docs/MODEL.md section 1):

- virtual width ``V = L * w`` (expert slots a token can reach across depth);
- physical width ``P``;
- reuse ``rho = V / P``;
- exposure ``n_j = |{l : j in C_l}|`` per expert, and the experts no layer reaches (``n_j = 0``);
- routing paths ``log10 paths = L * log10 C(w, k)``.

The same quantities hold for both layouts (``V``, ``rho`` and the paths depend only on ``L, w, k``);
the exposure and the unreachable experts are counted from the windows themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from moue.errors import ConfigError

__all__ = ["Topology", "LAYOUTS", "family", "layerwise", "unipool", "grouped", "adjacent"]

LAYOUTS = ("ring", "clamped")


def family(n_layers: int, pool_size: int, window: int, stride: int) -> str:
    """The architecture family of a topology: ``unipool`` (every layer sees the whole pool),
    ``layerwise`` (private windows that tile the pool) or ``rotational`` (anything else)."""
    if window == pool_size and not stride:
        return "unipool"
    if stride == window and window * n_layers == pool_size:
        return "layerwise"
    return "rotational"


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Staggered windows for ``n_layers`` layers over a pool of ``pool_size`` experts."""

    n_layers: int
    pool_size: int
    window: int
    stride: int
    group: int = 1
    layout: str = "ring"

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
        if self.layout not in LAYOUTS:
            raise ConfigError("model.window_layout", self.layout, f"must be one of {', '.join(LAYOUTS)}")

    def offset(self, layer: int) -> int:
        """Lowest slot's expert of layer ``layer``'s window: ``u_l mod P`` (ring) or
        ``min(u_l, P - w)`` (clamped), ``u_l = s * floor(l / g)``."""
        start = self.stride * (layer // self.group)
        if self.layout == "clamped":
            return min(start, self.pool_size - self.window)
        return start % self.pool_size

    def window_ids(self, layer: int, window: int | None = None) -> list[int]:
        """Pool ids of layer ``layer``'s window in slot order; ``window`` (< ``w``): the first slots
        only (a narrower active window, see the module docstring)."""
        w = self.window if window is None else window
        o, P = self.offset(layer), self.pool_size
        if self.layout == "clamped":
            rot = min(self.stride * (layer // self.group), P - 1) - o
            return [o + (rot + j) % self.window for j in range(w)]
        return [(o + j) % P for j in range(w)]

    def exposure_at(self, window: int) -> tuple[int, ...]:
        """``n_j`` for an active window of the first ``window`` slots of every layer."""
        n = [0] * self.pool_size
        for layer in range(self.n_layers):
            for j in self.window_ids(layer, window):
                n[j] += 1
        return tuple(n)

    @cached_property
    def exposure(self) -> tuple[int, ...]:
        """``n_j``: how many layers can route to expert ``j``."""
        return self.exposure_at(self.window)

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
