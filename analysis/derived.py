"""Derived quantities of fitted laws, vectorised over bootstrap samples.

Conventions: compute-optimal quantities use ``C = 6 N D`` (Hoffmann et al. 2022); for a law
``L = E + A/N^alpha + B/D^beta`` the compute-optimal allocation is ``N_opt = G (C/6)^a_opt``,
``D_opt = (C/6)^b_opt / G`` with ``a_opt = beta/(alpha+beta)``, ``b_opt = alpha/(alpha+beta)``
and ``G = (alpha A / (beta B))^(1/(alpha+beta))``. Virtual-width laws are evaluated at the largest
observed virtual width unless a quantity says otherwise; ``v_best`` is the virtual width in the
observed range that minimises the predicted loss at the target budget (it sits on an end of the
range whenever the law is monotone in V, which the report states), and ``loss_gain_v`` the loss
reduction from the smallest to the largest observed V. ``n_cutoff`` is the model size beyond which
a larger V (or expert count) stops lowering the loss under an interaction law (Clark et al.).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["DerivedContext", "derived_quantities"]


@dataclass(frozen=True, kw_only=True)
class DerivedContext:
    """Where derived quantities are evaluated (taken from the data unless given)."""

    target_compute: float | None = None  # FLOPs, C = 6 N D
    n_ref: float | None = None  # active parameters for laws without D
    v_range: tuple[float, float] | None = None  # observed virtual widths (min, max)


def _compute_optimal(E, A, alpha, B, beta, C):
    """Compute-optimal N, D and loss at ``C``. A resample whose exponent sits on its lower bound
    (``alpha = 0``: N does not matter) gives ``G = 0`` and ``d_opt = inf``: the limit, not an error,
    so numpy's divide/overflow warnings are silenced here."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        s = alpha + beta
        G = (alpha * A / (beta * B)) ** (1.0 / s)
        n_opt = G * (C / 6.0) ** (beta / s)
        d_opt = (C / 6.0) ** (alpha / s) / G
        loss = E + A * n_opt**-alpha + B * d_opt**-beta
    return n_opt, d_opt, loss


def _cutoff(b, c, base):
    """``base^(-b/c)`` where ``c > 0`` (V helps below this N and hurts above), else inf."""
    ok = c > 0
    expo = np.where(ok, -b / np.where(ok, c, 1.0), 0.0)
    return np.where(ok, base ** np.minimum(expo, 300.0 / np.log10(base)), np.inf)


def _v_grid(ctx: DerivedContext) -> np.ndarray:
    lo, hi = ctx.v_range
    return np.geomspace(lo, hi, 65)


def derived_quantities(law_name: str, nat: Mapping[str, np.ndarray],
                       ctx: DerivedContext) -> dict[str, np.ndarray]:
    """Derived quantities of ``law_name`` from natural parameters ``nat`` (arrays of shape (B,))."""
    out: dict[str, np.ndarray] = {}
    C = ctx.target_compute
    if law_name == "compute" and C is not None:
        out["loss_at_target"] = nat["E"] + nat["A"] * C ** -nat["alpha"]
    elif law_name == "compute_power" and C is not None:
        out["loss_at_target"] = nat["A"] * C ** -nat["alpha"]
    elif law_name in ("chinchilla", "vw_additive", "vw_multiplicative"):
        alpha, beta = nat["alpha"], nat["beta"]
        out["a_opt"] = beta / (alpha + beta)
        out["b_opt"] = alpha / (alpha + beta)
        if C is None:
            return out
        if law_name == "chinchilla":
            n_opt, d_opt, loss = _compute_optimal(nat["E"], nat["A"], alpha, nat["B"], beta, C)
            out.update(loss_at_target=loss, n_opt_at_target=n_opt, d_opt_at_target=d_opt)
            return out
        if ctx.v_range is None:
            return out
        V = _v_grid(ctx)[:, None]  # (G, 1) against samples (B,)
        if law_name == "vw_additive":
            E_eff = nat["E"] + nat["G"] * V ** -nat["gamma"]
            A_eff = np.broadcast_to(nat["A"], E_eff.shape)
        else:
            E_eff = np.broadcast_to(nat["E"], (V.shape[0], nat["E"].shape[0]))
            A_eff = nat["A"] * V ** -nat["gamma"]
        n_opt, d_opt, loss = _compute_optimal(E_eff, A_eff, alpha, nat["B"], beta, C)
        out.update(loss_at_target=loss[-1], n_opt_at_target=n_opt[-1],
                   d_opt_at_target=d_opt[-1], loss_gain_v=loss[0] - loss[-1],
                   v_best=V[np.nanargmin(loss, axis=0), 0])
    elif law_name == "vw_interaction":
        a, b, c, d = nat["a"], nat["b"], nat["c"], nat["d"]
        out["n_cutoff"] = _cutoff(b, c, np.e)
        if ctx.n_ref is not None and ctx.v_range is not None:
            lN = np.log(ctx.n_ref)
            lV = np.log(_v_grid(ctx))[:, None]
            loss = np.exp(a * lN + b * lV + c * lN * lV + d)
            out.update(loss_at_n_ref=loss[-1], loss_gain_v=loss[0] - loss[-1],
                       v_best=np.exp(lV[np.nanargmin(loss, axis=0), 0]))
    elif law_name == "clark":
        out["n_cutoff"] = _cutoff(nat["b"], nat["c"], 10.0)
    return out
