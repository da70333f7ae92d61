"""Balance losses (docs/MODEL.md section 3), each normalised so uniform routing gives its coefficient.

Inputs, per layer ``l`` over the active window (width ``w``), stacked across layers:

    frac_Lw[l, j]  fraction of the layer's T*k routed slots sent to window slot j (no gradient)
    prob_Lw[l, j]  mean router probability of slot j over the layer's tokens (differentiable)
    ids_Lw[l, j]   pool id of window slot j of layer l

"Uniform routing" means every layer spreads its slots and probabilities evenly over its own
window: ``frac = prob = 1/w``. Under it each loss below equals ``coef`` exactly:

- ``switch``: per layer ``coef * w * sum_j f_j p_j``, averaged over layers.
- ``pool`` (UniPool): ``fbar_j = mean_l f_j^l`` and ``pbar_j = mean_l p_j^l`` over all layers
  (zero where ``j`` is outside ``C_l``), loss ``coef * sum_j fbar_j pbar_j / sum_j u_j^2`` with
  ``u_j = n_j / (L w)`` the uniform ``fbar``. When the windows tile the pool evenly ``sum u_j^2 =
  1/P`` and this is UniPool's ``coef * P * sum_j fbar_j pbar_j``; otherwise the normaliser keeps the
  uniform value at ``coef``. ``fbar`` may come from the previous micro-batch (UniPool's default).
- ``exposure`` (MoUE-style universal balance): statistics averaged only over the layers that can see
  each expert, ``fhat_j = (1/n_j) sum_(l: j in C_l) f_j^l`` (likewise ``phat``), loss
  ``coef * (w^2 / P') * sum_j fhat_j phat_j`` with ``P'`` the experts some layer can reach (``P``
  for every sensible topology). Optional per-depth weights ``gamma_l`` scale each layer's
  contribution (normalised to mean 1).
- ``none``: zero.

z-loss (ST-MoE): ``coef * mean over layers of mean_t logsumexp(z_t)^2``; independent of the above.
"""

from __future__ import annotations

import torch

__all__ = ["balance_loss", "pool_fraction", "z_loss", "LOSSES"]


def _scatter_mean_over_layers(values_Lw: torch.Tensor, ids_Lw: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Sum each pool expert's entries over layers: ``[L, w] -> [P]``."""
    out_P = values_Lw.new_zeros(pool_size)
    return out_P.index_add(0, ids_Lw.reshape(-1), values_Lw.reshape(-1))


def pool_fraction(frac_Lw: torch.Tensor, ids_Lw: torch.Tensor, pool_size: int) -> torch.Tensor:
    """``fbar_j = mean_l f_j^l``, the pool loss's load statistic (kept for the next micro-batch)."""
    return _scatter_mean_over_layers(frac_Lw.detach(), ids_Lw, pool_size) / frac_Lw.shape[0]


def _switch(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, prev_fbar_P, gamma_L):
    w = frac_Lw.shape[1]
    per_layer_L = w * (frac_Lw * prob_Lw).sum(dim=1)
    return coef * per_layer_L.mean()


def _pool(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, prev_fbar_P, gamma_L):
    L, w = frac_Lw.shape
    exposure_P = _scatter_mean_over_layers(torch.ones_like(frac_Lw), ids_Lw, pool_size)  # n_j
    fbar_P = pool_fraction(frac_Lw, ids_Lw, pool_size) if prev_fbar_P is None else prev_fbar_P
    pbar_P = _scatter_mean_over_layers(prob_Lw, ids_Lw, pool_size) / L
    uniform_P = exposure_P / (L * w)
    return coef * (fbar_P.to(pbar_P.dtype) * pbar_P).sum() / uniform_P.pow(2).sum()


def _exposure(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, prev_fbar_P, gamma_L):
    w = frac_Lw.shape[1]
    exposure_P = _scatter_mean_over_layers(torch.ones_like(frac_Lw), ids_Lw, pool_size)  # n_j
    if gamma_L is not None:
        weight_L1 = (gamma_L / gamma_L.mean()).to(prob_Lw.dtype).unsqueeze(1)
        frac_Lw, prob_Lw = frac_Lw * weight_L1, prob_Lw * weight_L1
    reach_P = exposure_P > 0
    n_P = exposure_P.clamp_min(1)
    fhat_P = _scatter_mean_over_layers(frac_Lw, ids_Lw, pool_size) / n_P
    phat_P = _scatter_mean_over_layers(prob_Lw, ids_Lw, pool_size) / n_P
    return coef * (w * w / reach_P.sum()) * (fhat_P * phat_P).sum()


def _none(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, prev_fbar_P, gamma_L):
    return prob_Lw.new_zeros(())


# model.balance -> its loss (the formulas of the module docstring); moue_core.config.BALANCES names them
LOSSES = {"switch": _switch, "pool": _pool, "exposure": _exposure, "none": _none}


def balance_loss(
    kind: str,
    coef: float,
    *,
    frac_Lw: torch.Tensor,
    prob_Lw: torch.Tensor,
    ids_Lw: torch.Tensor,
    pool_size: int,
    prev_fbar_P: torch.Tensor | None = None,
    gamma_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """The balance loss ``kind`` (a key of ``LOSSES``: ``switch`` | ``pool`` | ``exposure`` | ``none``)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown balance loss {kind!r}")
    if coef == 0:
        return prob_Lw.new_zeros(())
    frac_Lw = frac_Lw.detach().to(prob_Lw.dtype)
    return LOSSES[kind](frac_Lw, prob_Lw, ids_Lw, pool_size, coef=coef, prev_fbar_P=prev_fbar_P, gamma_L=gamma_L)


def z_loss(coef: float, lse_LT: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: ``coef * mean_l mean_t logsumexp(z_lt)^2``."""
    return coef * torch.stack([lse.pow(2).mean() for lse in lse_LT]).mean()
