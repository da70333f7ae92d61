"""Small derivations shared by the shipped spaces (pure arithmetic on settings)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moue.search_spaces.constraints import model_value

__all__ = ["half_up", "multiple_of_4", "listed", "layerwise_topology", "stride_from_overlap"]


def half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)


def multiple_of_4(x: float) -> int:
    """The nearest multiple of 4, at least 4 (fp32 grouped_mm, docs/MODEL.md section 5)."""
    return max(4, 4 * half_up(x / 4))


def listed(values: list, fixed: Mapping[str, Any], name: str) -> list:
    """An option list, or ``[model.<name>]`` of the study when the list is empty ("keep the study's")."""
    return list(values) if values else [model_value(fixed, name)]


def layerwise_topology(n_layers: int, experts_per_layer: int) -> dict[str, Any]:
    """Ordinary MoE, ``E`` private experts per layer: ``P = L*E, w = E, s = E`` (docs/MODEL.md table)."""
    p = n_layers * experts_per_layer
    return {"model.pool_size": p, "model.window": experts_per_layer, "model.stride": experts_per_layer % p}


def stride_from_overlap(window: int, overlap: float) -> int:
    """Stride that makes consecutive layers share a fraction ``overlap`` of their window:
    ``s = round(w * (1 - overlap))`` (0 -> tiling windows, ``s = w``)."""
    return half_up(window * (1.0 - overlap))
