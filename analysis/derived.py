"""Formulas that derived quantities of fitted laws share, vectorised over bootstrap samples.

Each law owns its derived quantities (``Law.derive`` in :mod:`moue.analysis.laws`) and builds them from
these pieces, taking its parameters by name. Conventions: compute-optimal quantities use
``C = 6 N D`` (Hoffmann et al. 2022); for a law ``L = E + A/N^alpha + B/D^beta`` the compute-optimal
allocation is ``N_opt = G (C/6)^a_opt``, ``D_opt = (C/6)^b_opt / G`` with
``a_opt = beta/(alpha+beta)``, ``b_opt = alpha/(alpha+beta)`` and
``G = (alpha A / (beta B))^(1/(alpha+beta))``. Virtual-width laws are evaluated at the largest
observed virtual width unless a quantity says otherwise; ``v_best`` is the virtual width in the
observed range that minimises the predicted loss at the target budget (it sits on an end of the
range whenever the law is monotone in V, which the report states), and ``loss_gain_v`` the loss
reduction from the smallest to the largest observed V. ``n_cutoff`` is the model size beyond which
a larger V (or expert count) stops lowering the loss under an interaction law (Clark et al.).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ComputeOptimal", "DerivedContext", "allocation_exponents", "compute_optimal",
           "cutoff", "optimum_over_v", "v_grid"]


@dataclass(frozen=True, kw_only=True)
class DerivedContext:
    """Where derived quantities are evaluated (taken from the data unless given)."""

    target_compute: float | None = None  # FLOPs, C = 6 N D
    n_ref: float | None = None  # active parameters for laws without D
    v_range: tuple[float, float] | None = None  # observed virtual widths (min, max)


@dataclass(frozen=True, kw_only=True)
class ComputeOptimal:
    """The compute-optimal allocation at a budget: model size, tokens and the loss there."""

    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray


def allocation_exponents(alpha: np.ndarray, beta: np.ndarray) -> dict[str, np.ndarray]:
    """``a_opt`` and ``b_opt``: how N_opt and D_opt scale with compute."""
    return {"a_opt": beta / (alpha + beta), "b_opt": alpha / (alpha + beta)}


def compute_optimal(*, E, A, alpha, B, beta, C) -> ComputeOptimal:
    """Compute-optimal N, D and loss of ``E + A/N^alpha + B/D^beta`` at ``C``. A resample whose
    exponent sits on its lower bound (``alpha = 0``: N does not matter) gives ``G = 0`` and
    ``d_opt = inf``: the limit, not an error, so numpy's divide/overflow warnings are silenced
    here."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        s = alpha + beta
        G = (alpha * A / (beta * B)) ** (1.0 / s)
        n_opt = G * (C / 6.0) ** (beta / s)
        d_opt = (C / 6.0) ** (alpha / s) / G
        loss = E + A * n_opt**-alpha + B * d_opt**-beta
    return ComputeOptimal(n=n_opt, d=d_opt, loss=loss)


def cutoff(b, c, base):
    """``base^(-b/c)`` where ``c > 0`` (V helps below this N and hurts above), else inf."""
    ok = c > 0
    expo = np.where(ok, -b / np.where(ok, c, 1.0), 0.0)
    return np.where(ok, base ** np.minimum(expo, 300.0 / np.log10(base)), np.inf)


def v_grid(ctx: DerivedContext) -> np.ndarray:
    """The observed virtual-width range on a log grid (its ends included)."""
    lo, hi = ctx.v_range
    return np.geomspace(lo, hi, 65)


def optimum_over_v(V: np.ndarray, opt: ComputeOptimal) -> dict[str, np.ndarray]:
    """Quantities of a compute-optimal allocation evaluated over the grid ``V`` (G, 1): at the
    largest V, the loss gained from the smallest to the largest V and the best V."""
    return {"loss_at_target": opt.loss[-1], "n_opt_at_target": opt.n[-1],
            "d_opt_at_target": opt.d[-1], "loss_gain_v": opt.loss[0] - opt.loss[-1],
            "v_best": V[np.nanargmin(opt.loss, axis=0), 0]}
